//! Model and store errors as gRPC statuses.

use blockserve_model::ModelError;
use blockserve_store::StoreError;
use tonic::Status;

pub fn from_model(e: ModelError) -> Status {
    match e {
        ModelError::Input(m) => Status::invalid_argument(m),
        ModelError::Capacity(m) => Status::resource_exhausted(m),
        other => Status::internal(other.to_string()),
    }
}

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
