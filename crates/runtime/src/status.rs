//! Store and peer errors as gRPC statuses, and the marks a session's stream
//! carries. (Engine errors are mapped in `blockserve-worker`.)

use blockserve_store::StoreError;
use tonic::Status;

pub fn from_store(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => Status::unavailable(format!("session store unavailable: {m}")),
        StoreError::Corrupt(m) => Status::internal(format!("session store: {m}")),
    }
}

/// Metadata key a token decoder sets on a session stream's error status to
/// say the error is the session's own (`failed`: it is recorded as failed) or
/// that the session moved to another token decoder (`moved`). A stream error
/// without it is a transport failure: the router migrates the session.
pub const SESSION_END: &str = "blockserve-session-end";

/// `status`, marked as the session's own end (`kind`: `failed` or `moved`).
pub fn session_end(mut status: Status, kind: &'static str) -> Status {
    status.metadata_mut().insert(SESSION_END, tonic::metadata::MetadataValue::from_static(kind));
    status
}

/// The mark [`session_end`] put on `status`, if any.
pub fn session_end_kind(status: &Status) -> Option<&str> {
    status.metadata().get(SESSION_END).and_then(|v| v.to_str().ok())
}

/// `e` and its sources, joined with ": " (tonic's transport errors say only
/// "transport error" and keep the cause, e.g. a refused certificate, in the
/// source chain).
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// A call to `peer` that failed in the transport (connection refused or
/// reset, a TLS handshake the peer refused) arrives as UNKNOWN "transport
/// error"; make it UNAVAILABLE with the cause, so callers retry or migrate
/// and clients see why. Statuses the peer sent are returned unchanged.
pub fn from_peer(peer: &str, st: Status) -> Status {
    use std::error::Error;
    match st.source() {
        Some(cause) if st.code() == tonic::Code::Unknown => Status::unavailable(format!("{peer} unreachable: {}", source_chain(cause))),
        _ => st,
    }
}
