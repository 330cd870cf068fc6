//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`
//! with the HTTP code that fits the gRPC status the session core gave.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::{Code, Status};

/// An HTTP error: the status, OpenAI's `type`, `param` and `code`, and the
/// message.
pub struct ApiError {
    pub http: StatusCode,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    /// A bad request naming the parameter at fault.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self { http: StatusCode::BAD_REQUEST, kind: "invalid_request_error", param: Some(param.to_string()), code: None, message: message.into() }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self { http: StatusCode::NOT_FOUND, kind: "invalid_request_error", param: None, code: Some(code), message: message.into() }
    }
}

/// The request field a validation message names, in OpenAI's spelling (the
/// session core names the gRPC fields).
fn param_of(message: &str) -> Option<String> {
    let first = message.split([' ', ':', '.']).next().unwrap_or("");
    let openai = match first {
        "max_new_tokens" => "max_tokens",
        "prompt" | "input" => "prompt",
        "temperature" | "top_p" | "top_k" | "repetition_penalty" | "seed" | "stop" | "stop_token_ids" | "session_id" => first,
        _ => return None,
    };
    Some(openai.to_string())
}

impl From<Status> for ApiError {
    fn from(st: Status) -> Self {
        let message = st.message().to_string();
        let (http, kind, code) = match st.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key")),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "invalid_request_error", None),
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found")),
            Code::AlreadyExists => (StatusCode::CONFLICT, "invalid_request_error", Some("already_exists")),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("rate_limit_exceeded")),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("unavailable")),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("timeout")),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        let param = if http == StatusCode::BAD_REQUEST { param_of(&message) } else { None };
        Self { http, kind, param, code, message }
    }
}

impl ApiError {
    /// The error body (also what a stream sends as its last event).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.http, axum::Json(self.body())).into_response();
        if self.http == StatusCode::TOO_MANY_REQUESTS {
            // Every instance is full or this router relays its limit: soon.
            r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_become_openai_errors() {
        let cases = [
            (Status::invalid_argument("max_new_tokens 5000 exceeds the limit of 1024"), 400, "invalid_request_error", Some("max_tokens"), None),
            (Status::unauthenticated("authorization: missing"), 401, "invalid_request_error", None, Some("invalid_api_key")),
            (Status::not_found("session \"x\" not found"), 404, "invalid_request_error", None, Some("not_found")),
            (Status::resource_exhausted("full"), 429, "rate_limit_error", None, Some("rate_limit_exceeded")),
            (Status::unavailable("no live token decoder"), 503, "server_error", None, Some("unavailable")),
            (Status::deadline_exceeded("late"), 504, "server_error", None, Some("timeout")),
            (Status::internal("boom"), 500, "server_error", None, None),
        ];
        for (st, http, kind, param, code) in cases {
            let e = ApiError::from(st);
            assert_eq!((e.http.as_u16(), e.kind, e.param.as_deref(), e.code), (http, kind, param, code));
        }
    }
}
