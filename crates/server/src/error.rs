//! Errors as TEI reports them: a status code and `{"error", "error_type"}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// One error answer. `error_type` follows text-embeddings-inference (`validation` 413,
/// `tokenizer` 422, `overloaded` 429, `unhealthy` 503, `empty` 400, `backend` 424) and adds
/// `unauthorized` (401), `not_found` (404), `method_not_allowed` (405), `timeout` (a body
/// that does not arrive 408, a request over its deadline 503) and `invalid_request`
/// (malformed JSON or a field out of range, 400/415/422).
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message naming the field and what was expected.
    pub message: String,
    /// Machine-readable class.
    pub error_type: &'static str,
    /// Answer with `Connection: close`: the request body was not (fully) read, so the
    /// connection cannot serve another request and must not wait for the rest.
    pub close: bool,
}

/// The JSON body of every error.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// `validation`, `tokenizer`, `overloaded`, `unhealthy`, `empty`, `backend`,
    /// `unauthorized`, `not_found`, `method_not_allowed`, `timeout` or `invalid_request`.
    pub error_type: String,
}

impl ApiError {
    fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            error_type,
            close: false,
        }
    }

    /// A request over a size limit (inputs, tokens, bytes): 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "validation", message)
    }

    /// A well-formed request with a field out of range: 422.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// Text the tokenizer rejects: 422.
    pub fn tokenizer(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "tokenizer", message)
    }

    /// Empty input: 400.
    pub fn empty(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "empty", message)
    }

    /// The queue is full: 429.
    pub fn overloaded() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            "model is overloaded: the request queue is full, retry later",
        )
    }

    /// The model workers are gone (shutting down or crashed): 503.
    pub fn unhealthy(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", message)
    }

    /// Missing or wrong API key: 401.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key: send `Authorization: Bearer <key>`",
        )
    }

    /// No such resource: 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A route called with a method it does not serve: 405.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not serve that method; see /openapi.json",
        )
    }

    /// The request body did not arrive in time (408) or the request ran past its deadline
    /// (503).
    pub fn timeout(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, "timeout", message)
    }

    /// The same answer, closing the connection after it.
    pub fn closing(self) -> Self {
        ApiError {
            close: true,
            ..self
        }
    }

    /// The model or the index failed: 424, as TEI answers backend failures.
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FAILED_DEPENDENCY, "backend", message)
    }

    /// A request axum could not parse (syntax 400, content type 415, fields 422, body over
    /// the payload limit 413), in our error shape.
    pub fn rejection(status: StatusCode, message: String) -> Self {
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "validation"
        } else {
            "invalid_request"
        };
        Self::new(status, kind, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            error_type: self.error_type.to_string(),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.close {
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // The queue drains in about a batch's time; a second is a fair first retry.
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.error_type, self.message)
    }
}
