//! A real KMS-protocol server for the `aws-kms` tests: moto's server.
//!
//! `KEYWARD_TEST_KMS_ENDPOINT` (an already running KMS-compatible server)
//! wins when set. Otherwise one `moto_server` (from `.tools/venv`, where
//! `scripts/test` installs it, or from PATH) is started on a free loopback
//! port for the whole test process and stopped by a detached reaper when
//! the process exits. Tests create their own KMS keys, so they stay
//! independent on the shared server. [`Proxy`] puts a severable TCP hop in
//! front of it, to take the KMS away mid-test.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use aws_sdk_kms::Client;
use keyward::{config::KmsSettings, crypto::kms::AwsKmsSettings};
use tokio::sync::watch;

pub const REGION: &str = "us-east-1";

/// The KMS endpoint URL, or why there is none.
pub fn endpoint() -> Result<&'static str, &'static str> {
    static ENDPOINT: OnceLock<Result<String, String>> = OnceLock::new();
    ENDPOINT
        .get_or_init(|| {
            // Static test credentials for the SDK's standard chain (moto
            // accepts any); set once, before any client reads them.
            for (name, value) in [
                ("AWS_ACCESS_KEY_ID", "keyward-test"),
                ("AWS_SECRET_ACCESS_KEY", "keyward-test-secret"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ] {
                if std::env::var_os(name).is_none() {
                    std::env::set_var(name, value);
                }
            }
            match std::env::var("KEYWARD_TEST_KMS_ENDPOINT") {
                Ok(url) if !url.is_empty() => Ok(url),
                _ => start_moto(),
            }
        })
        .as_deref()
        .map_err(|e| e.as_str())
}

/// The endpoint, `None` (with a note) when no KMS server can be had, and a
/// panic instead when `CI=true`, so CI never passes by skipping.
pub fn endpoint_or_skip() -> Option<&'static str> {
    match endpoint() {
        Ok(url) => Some(url),
        Err(reason) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("the moto KMS server is required in CI but unavailable: {reason}");
            }
            eprintln!("SKIPPED (moto KMS server unavailable: {reason})");
            None
        }
    }
}

fn moto_binary() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/moto_server");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
}

fn start_moto() -> Result<String, String> {
    let bin =
        moto_binary().ok_or("moto_server not found (scripts/test installs it into .tools/venv)")?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("free port: {e}"))?
        .port();
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    spawn_reaper(child.id());
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("moto_server did not listen on {addr} within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(format!("http://{addr}"))
}

/// Stops moto once this test process is gone.
fn spawn_reaper(moto_pid: u32) {
    crate::postgres::after_this_process(&format!("kill {moto_pid} 2>/dev/null"));
}

/// keyward's KMS settings for `endpoint`: quick retries so outage tests
/// do not wait on production backoffs.
pub fn kms_settings(endpoint: &str) -> KmsSettings {
    KmsSettings {
        aws: AwsKmsSettings {
            region: Some(REGION.into()),
            endpoint: Some(endpoint.into()),
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            connect_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(10),
        },
        ..KmsSettings::default()
    }
}

/// An SDK client for setting up keys on the KMS server.
pub async fn client(endpoint: &str) -> Client {
    Client::new(&keyward::crypto::kms::aws::load_sdk_config(&kms_settings(endpoint).aws).await)
}

/// Creates a symmetric KMS key; returns its ARN.
pub async fn create_key(client: &Client) -> String {
    let out = client.create_key().send().await.unwrap();
    out.key_metadata.unwrap().arn.unwrap()
}

/// The key id at the end of a key ARN (moto's EnableKey wants the id).
pub fn key_id(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// A TCP hop in front of the KMS that a test can cut (every open connection
/// closed, new ones refused at once), stall (connections stay open and
/// nothing comes back: a hung KMS) and restore.
pub struct Proxy {
    pub addr: SocketAddr,
    state: watch::Sender<Link>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Cut,
    Stalled,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Arc<Proxy> {
        let upstream: SocketAddr = upstream.trim_start_matches("http://").parse().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, watch) = watch::channel(Link::Up);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut link = watch.clone();
                let now = *link.borrow();
                match now {
                    Link::Cut => continue, // dropped: the connection closes at once
                    Link::Stalled => {
                        // Held open, unanswered, until the link changes.
                        tokio::spawn(async move {
                            let _ = link.wait_for(|l| *l != Link::Stalled).await;
                            drop(inbound);
                        });
                        continue;
                    }
                    Link::Up => {}
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let changed = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                        changed = link.wait_for(|l| *l != Link::Up) => changed.map(|l| *l),
                    };
                    if matches!(changed, Ok(Link::Stalled)) {
                        // Requests on this connection go unanswered.
                        let _ = link.wait_for(|l| *l != Link::Stalled).await;
                    }
                });
            }
        });
        Arc::new(Proxy { addr, state })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.state.send_replace(Link::Cut);
    }

    /// Connections stay open but nothing is answered, as with a KMS that
    /// hangs; `restore` closes them.
    pub fn stall(&self) {
        self.state.send_replace(Link::Stalled);
    }

    pub fn restore(&self) {
        self.state.send_replace(Link::Up);
    }
}
