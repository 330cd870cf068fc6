//! Per-call checks that tonic leaves out or answers with other codes than gRPC
//! clients expect, as one tower layer in front of every tier's services.
//!
//! - **Metadata size.** hyper's HTTP/2 default (16 KiB, with a GOAWAY at four
//!   times that) ends the whole connection over one oversized header, killing
//!   every other call on it. Servers accept header lists up to
//!   [`HTTP2_MAX_HEADER_LIST`] and this layer refuses one call whose metadata
//!   is over [`MAX_METADATA_BYTES`] with RESOURCE_EXHAUSTED; the connection
//!   and its other calls go on.
//! - **Deadlines.** tonic times a call out with CANCELLED "Timeout expired";
//!   gRPC says DEADLINE_EXCEEDED. This layer's own timer, set from the same
//!   `grpc-timeout` a hair earlier, answers first.
//! - **Undecodable requests.** A request that is not a valid message (bad
//!   UTF-8 in a string field, truncated, random bytes) comes back from tonic
//!   as INTERNAL; it is the client's fault: INVALID_ARGUMENT. A message over
//!   the size limit comes back as OUT_OF_RANGE; gRPC's convention is
//!   RESOURCE_EXHAUSTED.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::{Code, Status};

/// Largest header list the HTTP/2 layer takes without ending the connection
/// (h2 sends GOAWAY past four times its setting).
pub const HTTP2_MAX_HEADER_LIST: u32 = 1 << 20;
/// Largest metadata (names and values) one call may carry.
pub const MAX_METADATA_BYTES: usize = 16 << 10;

/// The layer for `Server::builder().layer(..)`.
#[derive(Clone, Copy, Default)]
pub struct GuardLayer;

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard(inner)
    }
}

#[derive(Clone)]
pub struct Guard<S>(S);

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Guard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let size: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        if size > MAX_METADATA_BYTES {
            let st = Status::resource_exhausted(format!("request metadata is {size} bytes; the limit is {MAX_METADATA_BYTES} bytes"));
            return Box::pin(std::future::ready(Ok(st.into_http())));
        }
        let deadline = grpc_timeout(req.headers());
        let call = self.0.call(req);
        Box::pin(async move {
            let response = match deadline {
                // tonic's timer starts a moment before this one and both round to
                // the same millisecond tick; one millisecond less makes this one
                // fire first (tonic polls the call before its own timer).
                Some(d) => match tokio::time::timeout(d.saturating_sub(Duration::from_millis(1)), call).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(Status::deadline_exceeded("the call's deadline (grpc-timeout) passed").into_http()),
                },
                None => call.await?,
            };
            Ok(recode(response))
        })
    }
}

/// tonic's statuses for requests it could not decode, with the codes gRPC
/// clients expect.
fn recode(response: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    let Some(st) = Status::from_header_map(response.headers()) else { return response };
    let message = st.message();
    let code = match st.code() {
        Code::Internal if message.starts_with("failed to decode Protobuf message") || message.starts_with("Unexpected EOF decoding stream") => {
            Code::InvalidArgument
        }
        Code::OutOfRange if message.starts_with("Error, decoded message length too large") => Code::ResourceExhausted,
        _ => return response,
    };
    let detail = message.trim_start_matches("Error, ");
    Status::new(code, format!("the request could not be decoded: {detail}")).into_http()
}

/// The `grpc-timeout` a client set on a call (its deadline), if any.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(st: Status) -> http::Response<tonic::body::Body> {
        st.into_http()
    }

    fn status(r: &http::Response<tonic::body::Body>) -> (Code, String) {
        let st = Status::from_header_map(r.headers()).unwrap();
        (st.code(), st.message().to_string())
    }

    #[test]
    fn decode_failures_become_the_clients_fault() {
        let bad_utf8 = response(Status::internal("failed to decode Protobuf message: GenerateRequest.text: invalid string value: data is not UTF-8 encoded"));
        assert_eq!(
            status(&recode(bad_utf8)),
            (
                Code::InvalidArgument,
                "the request could not be decoded: failed to decode Protobuf message: GenerateRequest.text: invalid string value: data is not UTF-8 encoded"
                    .into()
            )
        );
        let eof = response(Status::internal("Unexpected EOF decoding stream."));
        assert_eq!(status(&recode(eof)), (Code::InvalidArgument, "the request could not be decoded: Unexpected EOF decoding stream.".into()));
        let big = response(Status::out_of_range("Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes"));
        assert_eq!(
            status(&recode(big)),
            (
                Code::ResourceExhausted,
                "the request could not be decoded: decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes".into()
            )
        );
        // Statuses of the services themselves pass unchanged.
        for st in [Status::internal("engine failed"), Status::out_of_range("offset 9"), Status::not_found("x")] {
            let (code, message) = (st.code(), st.message().to_string());
            assert_eq!(status(&recode(response(st))), (code, message));
        }
    }

    #[test]
    fn reads_grpc_timeout_in_every_unit() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(h("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(h("3M"), Some(Duration::from_secs(180)));
        assert_eq!(h("4S"), Some(Duration::from_secs(4)));
        assert_eq!(h("50m"), Some(Duration::from_millis(50)));
        assert_eq!(h("7u"), Some(Duration::from_micros(7)));
        assert_eq!(h("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(h("9x"), None);
        assert_eq!(h(""), None);
    }
}
