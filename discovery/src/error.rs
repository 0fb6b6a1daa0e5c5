//! The server's error type: every failure becomes `{"error": code, "message": text}`
//! with a fixed status per code.

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};

use crate::{api::ErrorBody, record::RecordError, store::StoreError};

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:ident, $doc:literal)),* $(,)?) => {
        /// The stable error codes of the API and their HTTP statuses.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $(#[doc = $doc] $variant,)*
        }

        impl ErrorCode {
            /// Every code, in documentation order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code as it appears in the `error` field.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The HTTP status that goes with the code.
            pub fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status,)* }
            }

            /// Parses a code received from a server.
            pub fn parse(code: &str) -> Option<Self> {
                match code { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    MalformedRequest => ("malformed_request", BAD_REQUEST, "The request is not valid HTTP/1.1 (refused before routing)."),
    UriTooLong => ("uri_too_long", URI_TOO_LONG, "The request line's URI is too long."),
    HeadersTooLarge => ("headers_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE, "The request's headers are too large or too many."),
    RequestTimeout => ("request_timeout", REQUEST_TIMEOUT, "The request (its headers or body) did not arrive within the server's deadline."),
    TooManyConnections => ("too_many_connections", SERVICE_UNAVAILABLE, "This client address, or the server as a whole, has its maximum number of open connections."),
    MalformedJson => ("malformed_json", BAD_REQUEST, "The body is not the expected JSON."),
    UnsupportedMediaType => ("unsupported_media_type", UNSUPPORTED_MEDIA_TYPE, "The body is not `application/json` (with no parameter but `charset=utf-8`)."),
    BodyTooLarge => ("body_too_large", PAYLOAD_TOO_LARGE, "The request body exceeds the server's limit."),
    InvalidRecord => ("invalid_record", BAD_REQUEST, "A signed record does not decode or breaks a bound (size, addresses, TTL)."),
    InvalidName => ("invalid_name", BAD_REQUEST, "A name is not 1 to 32 characters of a-z, 0-9, '_', '-'."),
    InvalidNodeId => ("invalid_node_id", BAD_REQUEST, "A NodeId in the path is not canonical base32 of a valid key."),
    InvalidParameter => ("invalid_parameter", BAD_REQUEST, "A path or query parameter is malformed (bad cursor, limit or encoding)."),
    InvalidEnvelope => ("invalid_envelope", BAD_REQUEST, "An envelope is not base64url or is empty."),
    BadSignature => ("bad_signature", UNAUTHORIZED, "A signature does not verify with the key of the node it names."),
    Unauthenticated => ("unauthenticated", UNAUTHORIZED, "A mailbox request lacks its signature or timestamp headers."),
    ReplayedRequest => ("replayed_request", UNAUTHORIZED, "A signed mailbox request was already used."),
    TimestampOutOfWindow => ("timestamp_out_of_window", BAD_REQUEST, "A timestamp is too far from the server's clock."),
    StaleRecord => ("stale_record", CONFLICT, "A record is not newer than the one stored, or already expired."),
    NameTaken => ("name_taken", CONFLICT, "The name belongs to another key."),
    NameNotClaimed => ("name_not_claimed", CONFLICT, "A presence record names a name its key has not claimed."),
    NotFound => ("not_found", NOT_FOUND, "No such name, node or record."),
    UnknownRoute => ("unknown_route", NOT_FOUND, "No such endpoint."),
    MethodNotAllowed => ("method_not_allowed", METHOD_NOT_ALLOWED, "The endpoint does not take this method."),
    EnvelopeTooLarge => ("envelope_too_large", PAYLOAD_TOO_LARGE, "A mailbox envelope exceeds the size limit."),
    MailboxFull => ("mailbox_full", TOO_MANY_REQUESTS, "The recipient's mailbox holds its maximum number of envelopes."),
    RateLimited => ("rate_limited", TOO_MANY_REQUESTS, "Too many write requests from this client; see Retry-After."),
    ServerFull => ("server_full", SERVICE_UNAVAILABLE, "The server holds its maximum number of live records."),
    StoreUnavailable => ("store_unavailable", SERVICE_UNAVAILABLE, "The server's database cannot be reached now; nothing was changed, retry after Retry-After."),
    Internal => ("internal", INTERNAL_SERVER_ERROR, "A storage failure on the server (never caused by input)."),
}

/// An error response of the discovery server.
#[derive(Debug, Clone)]
pub struct AppError {
    pub code: ErrorCode,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds, rounded up).
    pub retry_after: Option<Duration>,
}

impl AppError {
    /// An error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl From<RecordError> for AppError {
    fn from(e: RecordError) -> Self {
        let code = match e {
            RecordError::BadSignature { .. } => ErrorCode::BadSignature,
            RecordError::InvalidName { .. } => ErrorCode::InvalidName,
            _ => ErrorCode::InvalidRecord,
        };
        AppError::new(code, e.to_string())
    }
}

/// `Retry-After` of a `503 store_unavailable`.
pub const STORE_RETRY_AFTER: Duration = Duration::from_secs(2);

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "discovery store unavailable");
            AppError::new(
                ErrorCode::StoreUnavailable,
                "the discovery database cannot be reached; retry shortly",
            )
            .with_retry_after(STORE_RETRY_AFTER)
        } else {
            tracing::error!(error = %e, "discovery storage failure");
            AppError::new(ErrorCode::Internal, "storage failure")
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.as_str().to_owned(),
            message: self.message,
        };
        let mut resp = (self.code.status(), Json(body)).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        // Lets the metrics layer count rejections by reason.
        resp.extensions_mut().insert(self.code);
        resp
    }
}
