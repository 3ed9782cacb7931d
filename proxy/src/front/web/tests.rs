use super::*;

#[test]
fn plain_paths_and_index() {
    assert_eq!(resolve_path("/vnc.html").unwrap(), "vnc.html");
    assert_eq!(resolve_path("/").unwrap(), "index.html");
    assert_eq!(
        resolve_path("/novnc/core/rfb.js").unwrap(),
        "novnc/core/rfb.js"
    );
    assert_eq!(resolve_path("/app/").unwrap(), "app/index.html");
    assert_eq!(resolve_path("//a///b").unwrap(), "a/b");
    assert_eq!(resolve_path("/a%20b.html").unwrap(), "a b.html");
    assert_eq!(resolve_path("/caf%C3%A9").unwrap(), "café");
    // `..` inside a name is not a dot segment.
    assert_eq!(resolve_path("/a..b").unwrap(), "a..b");
}

#[test]
fn traversal_is_refused() {
    for p in [
        "/..",
        "/../etc/passwd",
        "/a/../../etc/passwd",
        "/a/./b",
        "/.",
        "/.git/config",
        "/%2e%2e/etc/passwd",
        "/%2E%2E/%2e%2e/etc/passwd",
        "/a/%2e%2e/%2e%2e/x",
        "/%2e/x",
        "/.%2e/x",
    ] {
        assert_eq!(resolve_path(p), Err(PathError::DotSegment), "{p}");
    }
}

#[test]
fn separators_nul_and_control_are_refused() {
    assert_eq!(resolve_path("/..%2fetc"), Err(PathError::Separator));
    assert_eq!(resolve_path("/%2fetc/passwd"), Err(PathError::Separator));
    assert_eq!(resolve_path("/a%2F..%2F..%2Fx"), Err(PathError::Separator));
    assert_eq!(
        resolve_path("/..%5c..%5cwindows"),
        Err(PathError::Separator)
    );
    assert_eq!(resolve_path("/a\\b"), Err(PathError::Separator));
    assert_eq!(resolve_path("/vnc.html%00.png"), Err(PathError::Control));
    assert_eq!(
        resolve_path("/a%0d%0aSet-Cookie:x"),
        Err(PathError::Control)
    );
    assert_eq!(resolve_path("/a%7f"), Err(PathError::Control));
}

#[test]
fn absolute_and_malformed_are_refused() {
    assert_eq!(resolve_path("etc/passwd"), Err(PathError::NotAbsolute));
    assert_eq!(resolve_path(""), Err(PathError::NotAbsolute));
    assert_eq!(resolve_path("*"), Err(PathError::NotAbsolute));
    assert_eq!(resolve_path("http://x/"), Err(PathError::NotAbsolute));
    // An absolute file system path in the URL stays relative to the root.
    assert_eq!(resolve_path("//etc/passwd").unwrap(), "etc/passwd");
    assert_eq!(resolve_path("/%"), Err(PathError::Encoding));
    assert_eq!(resolve_path("/%2"), Err(PathError::Encoding));
    assert_eq!(resolve_path("/%zz"), Err(PathError::Encoding));
    assert_eq!(resolve_path("/%c3%28"), Err(PathError::Encoding));
    assert_eq!(resolve_path("/%+1"), Err(PathError::Encoding));
    let long = format!("/{}", "a".repeat(MAX_PATH));
    assert_eq!(resolve_path(&long), Err(PathError::TooLong));
    let deep = "/a".repeat(MAX_SEGMENTS + 1);
    assert_eq!(resolve_path(&deep), Err(PathError::TooLong));
    assert!(resolve_path(&"/a".repeat(MAX_SEGMENTS)).is_ok());
}

#[test]
fn content_types() {
    assert_eq!(content_type("vnc.html"), "text/html; charset=utf-8");
    assert_eq!(
        content_type("novnc/core/rfb.js"),
        "text/javascript; charset=utf-8"
    );
    assert_eq!(
        content_type("xterm/lib/xterm.mjs"),
        "text/javascript; charset=utf-8"
    );
    assert_eq!(
        content_type("xterm/css/xterm.css"),
        "text/css; charset=utf-8"
    );
    assert_eq!(
        content_type("novnc/LICENSE.txt"),
        "text/plain; charset=utf-8"
    );
    assert_eq!(content_type("xterm/LICENSE"), "text/plain; charset=utf-8");
    assert_eq!(
        content_type("novnc/docs/LICENSE.MPL-2.0"),
        "text/plain; charset=utf-8"
    );
    assert_eq!(content_type("a.SVG"), "image/svg+xml");
    assert_eq!(content_type("blob"), "application/octet-stream");
    assert_eq!(content_type("x.exe"), "application/octet-stream");
}

#[test]
fn builtin_pages_are_embedded() {
    for p in [
        "index.html",
        "vnc.html",
        "serial.html",
        "licenses.html",
        "console/vnc.js",
    ] {
        assert!(builtin(p).is_some(), "{p} not embedded");
    }
    assert!(builtin("novnc/../vnc.html").is_none());
    if Web::libraries_installed() {
        for p in [
            "novnc/core/rfb.js",
            "xterm/lib/xterm.mjs",
            "novnc/LICENSE.txt",
            "xterm/LICENSE",
        ] {
            assert!(builtin(p).is_some(), "{p} not embedded");
        }
    }
}

/// A temp dir: web root with a file, a subdir with index.html, a
/// symlink inside the root, a symlink out of it, and a secret outside.
struct Tree {
    base: PathBuf,
    root: PathBuf,
}

impl Tree {
    fn new(tag: &str) -> Self {
        let base = std::env::temp_dir().join(format!(
            "cg-web-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::write(root.join("page.html"), "<p>hi</p>").unwrap();
        std::fs::write(root.join("app/index.html"), "app").unwrap();
        std::fs::write(base.join("secret.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(root.join("page.html"), root.join("alias.html")).unwrap();
        std::os::unix::fs::symlink(base.join("secret.txt"), root.join("leak.txt")).unwrap();
        std::os::unix::fs::symlink(&base, root.join("up")).unwrap();
        let root = root.canonicalize().unwrap();
        Tree { base, root }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

async fn lookup(t: &Tree, path: &str) -> &'static str {
    let rel = resolve_path(path).unwrap();
    match from_root(&t.root, &rel).await {
        Lookup::Found(..) => "found",
        Lookup::Outside => "outside",
        Lookup::Missing => "missing",
    }
}

#[tokio::test]
async fn symlinks_cannot_leave_the_root() {
    let t = Tree::new("symlinks");
    assert_eq!(lookup(&t, "/page.html").await, "found");
    assert_eq!(lookup(&t, "/app/").await, "found");
    assert_eq!(
        lookup(&t, "/app").await,
        "found",
        "a directory serves its index.html"
    );
    assert_eq!(
        lookup(&t, "/alias.html").await,
        "found",
        "symlink inside the root"
    );
    assert_eq!(lookup(&t, "/leak.txt").await, "outside");
    assert_eq!(lookup(&t, "/up/secret.txt").await, "outside");
    // Out through a symlink and back in: the canonical path is inside.
    assert_eq!(lookup(&t, "/up/root/page.html").await, "found");
    assert_eq!(lookup(&t, "/nope.html").await, "missing");
    assert_eq!(
        lookup(&t, "/").await,
        "missing",
        "no index.html at the root"
    );
}

#[tokio::test]
async fn serve_sends_headers_and_never_the_query() {
    use crate::front::http::{HeadLimits, parse_request_head};
    let t = Tree::new("serve");
    let web = Web::new(Some(t.root.clone()));
    let get = |target: &str, extra: &str| {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        parse_request_head(raw.as_bytes(), &HeadLimits::default())
            .unwrap()
            .unwrap()
            .0
    };
    let mut out = Vec::new();
    let o = serve(&web, &get("/page.html?token=s3cret", ""), &mut out).await;
    assert_eq!(o, Outcome::Done);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    for h in [
        "Content-Type: text/html; charset=utf-8\r\n",
        "Content-Length: 9\r\n",
        "X-Content-Type-Options: nosniff\r\n",
        "Cache-Control: no-cache\r\n",
        "Referrer-Policy: no-referrer\r\n",
        "Content-Security-Policy: default-src 'self'; script-src 'self';",
    ] {
        assert!(text.contains(h), "missing {h:?} in {text}");
    }
    assert!(text.ends_with("\r\n\r\n<p>hi</p>"), "{text}");
    let etag = text
        .lines()
        .find_map(|l| l.strip_prefix("ETag: "))
        .unwrap()
        .to_owned();

    let mut out = Vec::new();
    serve(
        &web,
        &get("/page.html", &format!("If-None-Match: {etag}\r\n")),
        &mut out,
    )
    .await;
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "no body on 304: {text}");

    // Built-in files are found behind the web directory.
    let mut out = Vec::new();
    assert_eq!(
        serve(&web, &get("/console/vnc.js", ""), &mut out).await,
        Outcome::Done
    );
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("Content-Type: text/javascript"), "{text}");

    // Not a file: on to the WebSocket admission.
    let mut out = Vec::new();
    assert_eq!(
        serve(&web, &get("/websockify?token=x", ""), &mut out).await,
        Outcome::Pass
    );
    assert!(out.is_empty());
    // Traversal: 404 here.
    let mut out = Vec::new();
    assert_eq!(
        serve(&web, &get("/%2e%2e/secret.txt", ""), &mut out).await,
        Outcome::Done
    );
    assert!(String::from_utf8(out).unwrap().starts_with("HTTP/1.1 404 "));
    let mut out = Vec::new();
    assert_eq!(
        serve(&web, &get("/leak.txt", ""), &mut out).await,
        Outcome::Done
    );
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 404 ") && !text.contains("secret"),
        "{text}"
    );
}

#[tokio::test]
async fn not_installed_page_says_how_to_fix_it() {
    let mut out = Vec::new();
    send_not_installed(&mut out, "vnc.html").await;
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(
        text.contains("X-Content-Type-Options: nosniff\r\n"),
        "{text}"
    );
    assert!(text.contains("`cargo xtask web-assets`"), "{text}");
}

#[tokio::test]
async fn head_has_no_body_and_other_methods_pass() {
    use crate::front::http::{HeadLimits, parse_request_head};
    let web = Web::default();
    let req = |m: &str| {
        let raw = format!("{m} /index.html HTTP/1.1\r\nHost: x\r\n\r\n");
        parse_request_head(raw.as_bytes(), &HeadLimits::default())
            .unwrap()
            .unwrap()
            .0
    };
    let mut out = Vec::new();
    assert_eq!(serve(&web, &req("HEAD"), &mut out).await, Outcome::Done);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\n"),
        "{text}"
    );
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(len, builtin("index.html").unwrap().len());
    let mut out = Vec::new();
    assert_eq!(serve(&web, &req("POST"), &mut out).await, Outcome::Pass);
    assert!(out.is_empty());
}
