//! A throwaway PostgreSQL cluster for the test run.
//!
//! `KEYWARD_TEST_DATABASE_URL` (a server URL whose user may CREATE DATABASE)
//! wins when set. Otherwise one cluster is started from the local server
//! binaries (`initdb`/`pg_ctl` on PATH or under /usr/lib/postgresql/*/bin)
//! in a temporary directory on a free port, as the `postgres` OS user when
//! running as root. A detached reaper stops it and removes the directory
//! when this test process exits. Each test creates its own database.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

/// The server URL to create test databases on, or why there is none.
pub fn server_url() -> Result<&'static str, &'static str> {
    static SERVER: OnceLock<Result<String, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| match std::env::var("KEYWARD_TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => Ok(url),
            _ => start_cluster(),
        })
        .as_deref()
        .map_err(|e| e.as_str())
}

/// The server URL, or `None` (the test is skipped, saying so) when there
/// is no PostgreSQL, except in CI, where that fails the test.
pub fn server_or_skip() -> Option<&'static str> {
    match server_url() {
        Ok(server) => Some(server),
        Err(reason) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "PostgreSQL is required in CI but unavailable: {reason}"
            );
            eprintln!("SKIPPED (PostgreSQL unavailable: {reason})");
            None
        }
    }
}

/// Creates a database of its own (`{prefix}_<uuid>`) on `server` and
/// returns its URL.
pub async fn create_database(server: &str, prefix: &str) -> String {
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    format!("{server}/{name}")
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root
/// (initdb and postgres refuse to run as root).
fn pg_command(bin: &Path, root: bool) -> Command {
    if root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(bin);
        cmd
    } else {
        Command::new(bin)
    }
}

fn start_cluster() -> Result<String, String> {
    Ok(Cluster::start()?.url())
}

/// A PostgreSQL cluster this test process started, stopped and removed
/// when the process exits.
pub struct Cluster {
    bin: PathBuf,
    root: bool,
    dir: PathBuf,
    pub port: u16,
}

impl Cluster {
    /// A new primary cluster on a free port.
    pub fn start() -> Result<Cluster, String> {
        let bin = find_bin_dir().ok_or("no PostgreSQL server binaries (initdb, pg_ctl) found")?;
        // Where the other binaries (pg_basebackup) are too, when PATH holds
        // links to a few.
        let bin = bin
            .join("pg_ctl")
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or(bin);
        let root = is_root();
        let dir = scratch_dir(root)?;
        let out = pg_command(&bin.join("initdb"), root)
            .args(["-D"])
            .arg(dir.join("data"))
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let cluster = Cluster {
            bin,
            root,
            dir,
            port: free_port()?,
        };
        cluster.run("")?;
        Ok(cluster)
    }

    /// A streaming standby of this cluster (`pg_basebackup -R`), reporting
    /// itself as `name` in the primary's `pg_stat_replication`.
    // The benchmarks' tests share this file and start no standby.
    #[allow(dead_code)]
    pub fn standby(&self, name: &str) -> Result<Cluster, String> {
        let dir = scratch_dir(self.root)?;
        let out = pg_command(&self.bin.join("pg_basebackup"), self.root)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-R", "-X", "stream", "--no-sync"])
            .output()
            .map_err(|e| format!("pg_basebackup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let standby = Cluster {
            bin: self.bin.clone(),
            root: self.root,
            dir,
            port: free_port()?,
        };
        standby.run(&format!("-c hot_standby=on -c cluster_name={name}"))?;
        Ok(standby)
    }

    /// The server URL (no database).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts the server with `extra` options, and its reaper.
    fn run(&self, extra: &str) -> Result<(), String> {
        let data = self.dir.join("data");
        let options = format!(
            "-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300 {extra}",
            port = self.port,
            dir = self.dir.display()
        );
        let out = pg_command(&self.bin.join("pg_ctl"), self.root)
            .arg("-D")
            .arg(&data)
            .args(["-o", &options, "-l"])
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            return Err(format!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        spawn_reaper(&self.bin, &data, &self.dir, self.root);
        Ok(())
    }
}

/// A new directory for a cluster, owned by `postgres` when we are root.
fn scratch_dir(root: bool) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "keyward-pg-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    if root {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !status.success() {
            return Err("chown of the cluster directory to postgres failed".into());
        }
    }
    Ok(dir)
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("free port: {e}"))
        .map(|a| a.port())
}

/// Stops the cluster and removes its directory once this process is gone.
fn spawn_reaper(bin: &Path, data: &Path, dir: &Path, root: bool) {
    let pg_ctl = bin.join("pg_ctl");
    let stop = if root {
        format!(
            "runuser -u postgres -- {} -D {} stop -m immediate",
            pg_ctl.display(),
            data.display()
        )
    } else {
        format!(
            "{} -D {} stop -m immediate",
            pg_ctl.display(),
            data.display()
        )
    };
    after_this_process(&format!(
        "{stop} >/dev/null 2>&1; rm -rf {dir}",
        dir = dir.display()
    ));
}

/// Runs shell `commands` once this test process has exited, from a
/// detached session (the test cluster's and moto's reapers).
pub fn after_this_process(commands: &str) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {commands}",
        pid = std::process::id(),
    );
    let _ = Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}
