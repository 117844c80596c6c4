//! A small blocking HTTP/1.1 client and message reader (std only), for the
//! app runtime's tests, its benchmark and the demo app: they talk to the
//! runtime from inside pod namespaces, over TCP or its unix socket.

use std::io::{self, BufRead, BufReader, Read, Write};

/// One request or response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Msg {
    /// The request line or status line.
    pub start: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Msg {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A response's status code (0 when the status line is malformed).
    pub fn status(&self) -> u16 {
        self.start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Reads one message; `None` at a clean end of stream. `no_body` is for a
/// response to HEAD and statuses that carry none (1xx, 204, 304).
pub fn read_msg<R: Read>(r: &mut BufReader<R>, no_body: bool) -> io::Result<Option<Msg>> {
    let mut start = String::new();
    if r.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut m = Msg {
        start: start.trim_end().to_string(),
        ..Msg::default()
    };
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "headers cut short",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            m.headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let status = m.status();
    if no_body || (m.start.starts_with("HTTP/") && (status < 200 || status == 204 || status == 304))
    {
        return Ok(Some(m));
    }
    if m.header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("chunk size {size:?}: {e}"),
                    )
                })?;
            if n == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let at = m.body.len();
            m.body.resize(at + n, 0);
            r.read_exact(&mut m.body[at..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = m
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        m.body.resize(n, 0);
        r.read_exact(&mut m.body)?;
    } else if m.start.starts_with("HTTP/") {
        // A response without length ends with the connection.
        r.read_to_end(&mut m.body)?;
    }
    Ok(Some(m))
}

/// Writes a request with a Content-Length body.
pub fn write_request<W: Write>(
    w: &mut W,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<()> {
    let mut all = vec![("host", "runtime")];
    all.extend_from_slice(headers);
    write_msg(w, &format!("{method} {path} HTTP/1.1"), &all, body)
}

/// Writes a response with a Content-Length body.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> io::Result<()> {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    write_msg(w, &format!("HTTP/1.1 {status} X"), &h, body)
}

/// One message in one write: start line, Content-Length, headers, body.
fn write_msg<W: Write>(
    w: &mut W,
    start: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!("{start}\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut buf = head.into_bytes();
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()
}

/// One request on an open connection (kept alive for the next).
#[derive(Debug)]
pub struct Conn<S: Read + Write> {
    reader: BufReader<S>,
}

impl<S: Read + Write> Conn<S> {
    pub fn new(stream: S) -> Self {
        Conn {
            reader: BufReader::new(stream),
        }
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Msg> {
        write_request(self.reader.get_mut(), method, path, headers, body)?;
        read_msg(&mut self.reader, method == "HEAD")?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            )
        })
    }
}

/// The app runtime's address as pods see it (the agent's default).
pub const RUNTIME: &str = "169.254.1.1:3500";

/// One request to the runtime from inside the network namespace `ns`
/// (a fresh connection, 10 s limit).
pub fn runtime_in(
    ns: &std::path::Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Msg> {
    let (method, path, body) = (method.to_string(), path.to_string(), body.to_vec());
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    crate::agent::in_netns(ns, move || {
        let addr: std::net::SocketAddr = RUNTIME.parse().map_err(io::Error::other)?;
        let s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Conn::new(s).request(&method, &path, &h, &body)
    })
}
