//! Sans-io HTTP/1.1 request-head parsing and response writing.
//!
//! The head parser wraps `httparse` with the limits a hostile tenant must not
//! exceed, and returns owned, typed values. Nothing here touches a socket.
#![forbid(unsafe_code)]

use percent_encoding::percent_decode_str;

/// Limits applied to a request head.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// Largest head (request line plus headers plus blank line) in bytes.
    pub max_bytes: usize,
    /// Largest number of header fields.
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self {
            max_bytes: 8 * 1024,
            max_headers: 64,
        }
    }
}

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// Request target as sent (origin-form, or authority-form for CONNECT).
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in order; names lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Why a request head was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HttpError {
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
}

/// Parses a request head from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the head and the number
/// of bytes it used. Bytes after the head (if any) belong to the next layer.
pub fn parse_request_head(
    buf: &[u8],
    limits: &HeadLimits,
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.max_bytes {
                Err(HttpError::TooLarge(limits.max_bytes))
            } else {
                Ok(None)
            }
        }
        Ok(httparse::Status::Complete(used)) => {
            if used > limits.max_bytes {
                return Err(HttpError::TooLarge(limits.max_bytes));
            }
            let method = req
                .method
                .ok_or(HttpError::Malformed("no method"))?
                .to_owned();
            let target = req
                .path
                .ok_or(HttpError::Malformed("no target"))?
                .to_owned();
            let minor_version = req.version.ok_or(HttpError::Malformed("no version"))?;
            let headers = req
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect();
            Ok(Some((
                RequestHead {
                    method,
                    target,
                    minor_version,
                    headers,
                },
                used,
            )))
        }
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::TooManyHeaders(limits.max_headers)),
        Err(e) => Err(HttpError::Malformed(match e {
            httparse::Error::HeaderName => "invalid header name",
            httparse::Error::HeaderValue => "invalid header value",
            httparse::Error::NewLine => "invalid line ending",
            httparse::Error::Status => "invalid status",
            httparse::Error::Token => "invalid token",
            httparse::Error::Version => "invalid HTTP version",
            _ => "invalid request",
        })),
    }
}

impl RequestHead {
    /// The first value of header `name` (lower-case), as UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Every value of header `name`, as UTF-8 (invalid ones skipped).
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Whether a comma-separated header (e.g. `Connection`) lists `token`,
    /// case-insensitively, in any of its fields.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.header_all(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Path part of an origin-form target (before `?`).
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(p, _)| p)
    }

    /// Query part of the target (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Percent-decoded value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query()?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| decode_component(v))
        })
    }

    /// Value of cookie `name` from any `Cookie` header.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.header_all("cookie")
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k.trim() == name).then(|| decode_component(v.trim().trim_matches('"')))
            })
    }
}

/// Percent-decodes a URL component (`+` is a space in query strings).
pub fn decode_component(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

/// Builds a complete HTTP/1.1 response with a short text body and
/// `Connection: close`.
pub fn error_response(status: u16, reason: &str, extra: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        body.len() + 1
    );
    for (k, v) in extra {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.push('\n');
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<(RequestHead, usize)>, HttpError> {
        parse_request_head(s.as_bytes(), &HeadLimits::default())
    }

    #[test]
    fn parses_complete_head_and_leaves_trailing_bytes() {
        let raw = "GET /websockify?token=a%2Bb&x=1 HTTP/1.1\r\nHost: h\r\nCookie: a=1; token=\"c\"\r\n\r\nEXTRA";
        let (head, used) = parse(raw).unwrap().unwrap();
        assert_eq!(used, raw.len() - 5);
        assert_eq!(head.method, "GET");
        assert_eq!(head.path(), "/websockify");
        assert_eq!(head.query_param("token").as_deref(), Some("a+b"));
        assert_eq!(head.query_param("x").as_deref(), Some("1"));
        assert_eq!(head.query_param("y"), None);
        assert_eq!(head.cookie("token").as_deref(), Some("c"));
        assert_eq!(head.header("host"), Some("h"));
    }

    #[test]
    fn partial_then_too_large() {
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(parse(&big), Err(HttpError::TooLarge(8192)));
    }

    #[test]
    fn too_many_headers_and_malformed() {
        let mut raw = String::from("GET / HTTP/1.1\r\n");
        for i in 0..70 {
            raw.push_str(&format!("H{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        assert_eq!(parse(&raw), Err(HttpError::TooManyHeaders(64)));
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse("\x00\x01\x02\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn connection_tokens_are_case_insensitive_lists() {
        let raw = "GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n";
        let (head, _) = parse(raw).unwrap().unwrap();
        assert!(head.header_has_token("connection", "upgrade"));
        assert!(!head.header_has_token("connection", "close"));
    }

    #[test]
    fn error_response_is_well_formed() {
        let r = error_response(403, "Forbidden", &[("X-A", "b")], "nope");
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(s.contains("Content-Length: 5\r\n"));
        assert!(s.ends_with("\r\n\r\nnope\n"));
    }
}
