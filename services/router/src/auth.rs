//! Bearer-token check on the public API. With `--api-token` set, every
//! `Generation` call must carry `authorization: Bearer <token>`; others get
//! UNAUTHENTICATED. Health and reflection stay open, so probes and tools like
//! grpcurl and ghz can still find the service.

use tonic::{Request, Status};

/// The interceptor for `GenerationServer::with_interceptor`.
#[derive(Clone)]
pub struct BearerToken(pub Option<String>);

/// Equal in constant time for equal lengths (the token's length is not secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Check an `authorization` header value against `token` (when one is set):
/// the gRPC interceptor and the HTTP front door give the same answers.
pub fn check(token: Option<&str>, header: Option<&[u8]>) -> Result<(), Status> {
    let Some(token) = token else { return Ok(()) };
    let Some(value) = header else {
        return Err(Status::unauthenticated("authorization: missing; this router needs \"Bearer <token>\""));
    };
    // The scheme is case-insensitive (RFC 7235 section 2.1); the token is not.
    let value = std::str::from_utf8(value).unwrap_or("");
    let given = value.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map_or("", |(_, t)| t.trim_start());
    if same(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Status::unauthenticated("authorization: the bearer token is not valid"))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        check(self.0.as_deref(), req.metadata().get("authorization").map(|v| v.as_bytes()))?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    fn call(token: Option<&str>, header: Option<&str>) -> Result<(), Status> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        BearerToken(token.map(String::from)).call(req).map(|_| ())
    }

    #[test]
    fn checks_the_bearer_token_only_when_one_is_set() {
        assert!(call(None, None).is_ok());
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            assert!(call(Some("s3cret"), Some(&format!("{scheme} s3cret"))).is_ok(), "{scheme}");
        }
        let missing = call(Some("s3cret"), None).unwrap_err();
        assert_eq!((missing.code(), missing.message()), (tonic::Code::Unauthenticated, "authorization: missing; this router needs \"Bearer <token>\""));
        for wrong in ["Bearer s3cre", "Bearer s3cret2", "Bearer S3CRET", "s3cret", "Basic s3cret", "Bearers3cret"] {
            let e = call(Some("s3cret"), Some(wrong)).unwrap_err();
            assert_eq!((e.code(), e.message()), (tonic::Code::Unauthenticated, "authorization: the bearer token is not valid"), "{wrong}");
        }
    }
}
