//! The small HTTP/1.1 subset the control API speaks, server and client side: one
//! request per connection (`Connection: close`), bodies by `Content-Length` only, JSON
//! in and out. Requests are capped (16 KiB of head, 1 MiB of body) and time out, so a
//! slow or hostile client holds one task for a bounded time and nothing else.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 1 << 20;
/// A whole request must arrive within this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path without the query string, percent-decoded.
    pub path: String,
    /// Query parameters, percent-decoded.
    pub query: Vec<(String, String)>,
    /// Header names are lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status and JSON body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Decodes `%XX` escapes (and `+` as space in queries).
pub fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, std::io::Error> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad("bad percent escape"))?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad("not UTF-8"))
}

/// Encodes everything but unreserved characters and `/`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

async fn read_head<R: AsyncRead + Unpin>(rd: &mut BufReader<R>) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = (&mut *rd)
            .take((MAX_HEAD - total) as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Err(bad("connection closed inside the request head"));
        }
        total += n;
        if total > MAX_HEAD {
            return Err(bad("request head larger than 16 KiB"));
        }
        let line = String::from_utf8(line).map_err(|_| bad("request head is not UTF-8"))?;
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn parse_headers(lines: &[String]) -> std::io::Result<Vec<(String, String)>> {
    lines
        .iter()
        .map(|l| {
            let (k, v) = l.split_once(':').ok_or_else(|| bad("malformed header"))?;
            Ok((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect()
}

async fn read_body<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    headers: &[(String, String)],
) -> std::io::Result<Vec<u8>> {
    if headers.iter().any(|(k, _)| k == "transfer-encoding") {
        return Err(bad("chunked bodies are not accepted; send Content-Length"));
    }
    let len = match headers.iter().find(|(k, _)| k == "content-length") {
        Some((_, v)) => v.parse::<usize>().map_err(|_| bad("bad Content-Length"))?,
        None => 0,
    };
    if len > MAX_BODY {
        return Err(bad("request body larger than 1 MiB"));
    }
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await?;
    Ok(body)
}

/// Reads one request.
pub async fn read_request<R: AsyncRead + Unpin>(rd: R) -> std::io::Result<Request> {
    Ok(read_request_admitted(rd, |_| true)
        .await?
        .expect("admitted"))
}

/// Reads one request; `admit` sees it (without its body) before a byte of the body is
/// read, and may refuse it: `Ok(None)`, the body left unread.
pub async fn read_request_admitted<R: AsyncRead + Unpin>(
    rd: R,
    admit: impl FnOnce(&Request) -> bool,
) -> std::io::Result<Option<Request>> {
    let mut rd = BufReader::new(rd);
    let head = read_head(&mut rd).await?;
    let first = head.first().ok_or_else(|| bad("empty request"))?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("only HTTP/1.x is spoken here"));
    }
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let mut query = Vec::new();
    for kv in q.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        query.push((percent_decode(k, true)?, percent_decode(v, true)?));
    }
    let headers = parse_headers(&head[1..])?;
    let mut req = Request {
        method: method.to_string(),
        path: percent_decode(path, false)?,
        query,
        headers,
        body: Vec::new(),
    };
    if !admit(&req) {
        return Ok(None);
    }
    req.body = read_body(&mut rd, &req.headers).await?;
    Ok(Some(req))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a response and ends the exchange.
pub async fn write_response<W: AsyncWrite + Unpin>(mut wr: W, r: &Response) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(&r.body).map_err(std::io::Error::other)?;
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        body.len() + 1
    );
    wr.write_all(head.as_bytes()).await?;
    wr.write_all(&body).await?;
    wr.write_all(b"\n").await?;
    wr.flush().await?;
    wr.shutdown().await
}

/// Client side: sends one request on `stream` and reads the response.
pub async fn call<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> std::io::Result<Response> {
    let (rd, mut wr) = tokio::io::split(stream);
    let body = match body {
        Some(b) => serde_json::to_vec(b).map_err(std::io::Error::other)?,
        None => Vec::new(),
    };
    let mut head = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    wr.write_all(head.as_bytes()).await?;
    wr.write_all(&body).await?;
    wr.flush().await?;
    let mut rd = BufReader::new(rd);
    let lines = read_head(&mut rd).await?;
    let status_line = lines.first().ok_or_else(|| bad("empty response"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("malformed status line {status_line:?}")))?;
    let headers = parse_headers(&lines[1..])?;
    let mut body = Vec::new();
    if headers.iter().any(|(k, _)| k == "content-length") {
        body = read_body(&mut rd, &headers).await?;
    } else {
        rd.take(MAX_BODY as u64).read_to_end(&mut body).await?;
    }
    let body = if body.iter().all(|b| b.is_ascii_whitespace()) {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(format!("response is not JSON: {e}")))?
    };
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_round_trips_through_client_and_server() {
        let (a, b) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(async move {
            let (rd, wr) = tokio::io::split(b);
            let req = read_request(rd).await.unwrap();
            assert_eq!(req.method, "POST");
            assert_eq!(req.path, "/v1/x y");
            assert_eq!(req.param("path"), Some("/a b/c&d"));
            assert_eq!(req.header("authorization"), Some("Bearer s"));
            let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
            write_response(
                wr,
                &Response {
                    status: 201,
                    body: serde_json::json!({"echo": v}),
                },
            )
            .await
            .unwrap();
        });
        let path = format!(
            "/v1/x%20y?path={}",
            percent_encode("/a b/c&d").replace('&', "%26")
        );
        let r = call(
            a,
            "POST",
            &path,
            &[("Authorization", "Bearer s")],
            Some(&serde_json::json!({"k": 1})),
        )
        .await
        .unwrap();
        server.await.unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body["echo"]["k"], 1);
    }

    #[tokio::test]
    async fn malformed_and_oversized_requests_are_errors() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nno-colon\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /%zz HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(
                read_request(raw).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(read_request(huge.as_bytes()).await.is_err());
    }

    #[tokio::test]
    async fn a_refused_request_is_answered_before_its_body_is_read() {
        // The head promises a body that never comes: admitted, reading it would wait.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"POST /v1/x HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
            .await
            .unwrap();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            read_request_admitted(server, |req| req.path != "/v1/x"),
        )
        .await
        .expect("the refusal waited for the body");
        assert!(r.unwrap().is_none());
    }
}
