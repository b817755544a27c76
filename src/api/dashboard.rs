//! The rotation dashboard's files on the gRPC address: the outermost layer
//! answers a browser's GET or HEAD that is not an RPC from
//! `serve --dashboard-dir` (tower-http's `ServeDir`), before gRPC-Web
//! translation (which refuses plain HTTP/1.1) and before authentication
//! (a page is public; every call it makes carries the operator's token).
//! Requests that name a keyward service, or are gRPC or gRPC-Web, always go
//! on to the services.
//!
//! Only regular files inside the directory are served: a path is resolved
//! (symlinks included) and refused unless it lands inside the canonical
//! directory, and no segment of the request or of the resolved path may
//! start with a dot (`.env`, `.git`). Anything else is a 404, as a missing
//! file is. `app` refuses to start with a directory holding the database or
//! a key file.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use futures::future::FutureExt as _;
use tower::{Layer, Service, ServiceExt as _};
use tower_http::services::ServeFile;

/// The directory files are served from.
#[derive(Debug)]
pub struct DashboardDir {
    /// Canonical: every served file's canonical path starts with it.
    root: PathBuf,
}

impl DashboardDir {
    /// The directory, canonicalised (it must exist).
    /// The directory, if it exists.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let root = dir.canonicalize()?;
        if !root.is_dir() {
            return Err(std::io::Error::other("not a directory"));
        }
        Ok(Self { root })
    }

    /// Whether it holds a built dashboard (an `index.html`): a missing or
    /// empty directory would answer 404 to every page, so `serve` refuses
    /// it at start.
    pub fn check_built(&self) -> std::io::Result<()> {
        if self.root.join("index.html").is_file() {
            return Ok(());
        }
        Err(std::io::Error::other(
            "no index.html: build the dashboard first (cd clients/dashboard && npm ci && \
             sh generate.sh && npm run build; see clients/README.md)",
        ))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file a request path names, if it may be served: a regular file
    /// inside the directory (`index.html` for a directory), with no dot
    /// segment in the request or in where its symlinks lead.
    pub fn resolve(&self, request_path: &str) -> Option<PathBuf> {
        let decoded = percent_encoding::percent_decode_str(request_path)
            .decode_utf8()
            .ok()?;
        let mut path = self.root.clone();
        for segment in decoded.split('/').filter(|s| !s.is_empty()) {
            if !is_plain_segment(segment) {
                return None;
            }
            path.push(segment);
        }
        let mut file = path.canonicalize().ok()?;
        if file.is_dir() {
            file = file.join("index.html").canonicalize().ok()?;
        }
        let inside = file.strip_prefix(&self.root).ok()?;
        let plain = inside
            .components()
            .all(|c| c.as_os_str().to_str().is_some_and(is_plain_segment));
        (plain && file.is_file()).then_some(file)
    }
}

/// A path segment that names an ordinary file or directory: no dotfile,
/// no `..`, no separator or NUL smuggled in by percent-encoding.
fn is_plain_segment(segment: &str) -> bool {
    !segment.starts_with('.') && !segment.contains(['\\', '\0', '/'])
}

#[derive(Clone)]
pub struct DashboardLayer {
    files: Option<Arc<DashboardDir>>,
}

impl DashboardLayer {
    pub fn new(dir: Option<DashboardDir>) -> Self {
        Self {
            files: dir.map(Arc::new),
        }
    }
}

impl<S> Layer<S> for DashboardLayer {
    type Service = Dashboard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Dashboard {
            inner,
            files: self.files.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Dashboard<S> {
    inner: S,
    files: Option<Arc<DashboardDir>>,
}

/// A GET or HEAD for a file: not gRPC or gRPC-Web, and naming no keyward
/// service.
fn is_file_request<B>(request: &http::Request<B>) -> bool {
    matches!(*request.method(), http::Method::GET | http::Method::HEAD)
        && !super::observe::is_grpc(request)
        && !request.uri().path().starts_with("/keyward.")
}

impl<S, B> Service<http::Request<B>> for Dashboard<S>
where
    S: super::HttpService<B>,
    B: Send + 'static,
{
    super::middleware_head!();

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match &self.files {
            Some(files) if is_file_request(&request) => {
                let file = files.resolve(request.uri().path());
                async move {
                    let Some(file) = file else {
                        return Ok(not_found());
                    };
                    // ServeFile's error type is Infallible: I/O errors are
                    // answered as 404/500 responses.
                    let response = match ServeFile::new(file).oneshot(request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    Ok(response.map(tonic::body::Body::new))
                }
                .boxed()
            }
            _ => {
                let mut inner = super::take_ready(&mut self.inner);
                inner.call(request).boxed()
            }
        }
    }
}

fn not_found() -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::empty());
    *response.status_mut() = http::StatusCode::NOT_FOUND;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_files_inside_the_directory_are_served() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "outside").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("index.html"), "<h1>").unwrap();
        std::fs::write(root.join("app.js"), "js").unwrap();
        std::fs::write(root.join(".env"), "ENCRYPTION_MASTER_KEY=x").unwrap();
        std::fs::create_dir(root.join("assets")).unwrap();
        std::fs::write(root.join("assets/style.css"), "css").unwrap();
        std::fs::create_dir(root.join(".git")).unwrap();
        std::fs::write(root.join(".git/config"), "git").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("passwd")).unwrap();
        std::os::unix::fs::symlink(root.join(".env"), root.join("env.txt")).unwrap();
        std::os::unix::fs::symlink(root.join("app.js"), root.join("alias.js")).unwrap();
        let files = DashboardDir::open(root).unwrap();
        let canonical = |p: &str| root.join(p).canonicalize().unwrap();

        assert_eq!(files.resolve("/"), Some(canonical("index.html")));
        assert_eq!(files.resolve("/app.js"), Some(canonical("app.js")));
        assert_eq!(
            files.resolve("/assets/style.css"),
            Some(canonical("assets/style.css"))
        );
        assert_eq!(files.resolve("/alias.js"), Some(canonical("app.js")));
        for refused in [
            "/.env",
            "/%2eenv",
            "/.git/config",
            "/assets/../.env",
            "/assets/%2e%2e/.env",
            "/..%2f..%2fetc%2fpasswd",
            "/passwd",
            "/env.txt",
            "/assets",
            "/missing.js",
            "/%ff",
        ] {
            assert_eq!(files.resolve(refused), None, "{refused}");
        }
    }
}
