//! The rotation dashboard's files on the gRPC address: the outermost layer
//! answers a browser's GET or HEAD that is not an RPC from
//! `serve --dashboard-dir` (tower-http's `ServeDir`), before gRPC-Web
//! translation (which refuses plain HTTP/1.1) and before authentication
//! (a page is public; every call it makes carries the operator's token).
//! Requests that name a keyward service, or are gRPC or gRPC-Web, always go
//! on to the services.

use std::{
    path::PathBuf,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt as _};
use tower::{Layer, Service, ServiceExt as _};
use tower_http::services::ServeDir;

#[derive(Clone)]
pub struct DashboardLayer {
    files: Option<ServeDir>,
}

impl DashboardLayer {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            files: dir.map(ServeDir::new),
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
    files: Option<ServeDir>,
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
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match &self.files {
            Some(files) if is_file_request(&request) => {
                let files = files.clone();
                async move {
                    // ServeDir's error type is Infallible: I/O errors are
                    // answered as 404/500 responses.
                    let response = match files.oneshot(request).await {
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
