//! The benchmarks run briefly, as their users run them: the real
//! `keyward-bench` binary, with what each one checks of its own results
//! (every call succeeds, every rotated row reads back). What they measure is
//! not asserted: that is the benchmarks' job, not a test's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly by design

// keyward's throwaway PostgreSQL cluster, shared with its end-to-end tests.
#[path = "../../tests/api/postgres.rs"]
mod postgres;

use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_keyward-bench");

fn bench(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

/// stdout, after checking the benchmark exited 0.
fn passed(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

fn assert_lines(report: &str, lines: &[&str]) {
    for line in lines {
        assert!(report.contains(line), "no {line:?} in:\n{report}");
    }
}

/// A database of its own on the test cluster; `None` (skipped) when there
/// is no PostgreSQL, except in CI, where that fails.
async fn fresh_postgres() -> Option<String> {
    let server = postgres::server_or_skip()?;
    Some(postgres::create_database(server, "kwb").await)
}

/// `throughput` runs every phase against its own in-process server and
/// reports each against the floor.
#[test]
fn throughput_reports_every_phase_against_the_floor() {
    let report = passed(
        bench(&[
            "throughput",
            "--seconds",
            "0.6",
            "--rounds",
            "2",
            "--concurrency",
            "4",
            "--batch-size",
            "10",
            "--batch-concurrency",
            "2",
        ])
        .output()
        .unwrap(),
    );
    assert_lines(
        &report,
        &[
            "Health/Check (floor)",
            "Encrypt ",
            "Decrypt ",
            "Rewrap ",
            "BatchEncrypt",
            "Encrypt/floor by round: min",
            "Decrypt/floor by round: min",
            "Rewrap/floor by round: min",
            "(2 rounds)",
        ],
    );
}

/// `aead`, briefly: both implementations seal and open every size, and the
/// table has a row per size.
#[test]
fn aead_compares_both_implementations_on_every_size() {
    let report = passed(
        bench(&[
            "aead",
            "--rounds",
            "1",
            "--ops",
            "200",
            "--payload-bytes",
            "32,1024",
        ])
        .output()
        .unwrap(),
    );
    assert_lines(&report, &["aws-lc-rs op/s", "      32 ", "    1024 "]);
}

/// `rotation` on the embedded default (SQLite): its rows, the floor, a
/// rotation under Encrypt load, the check that every row moved, and its
/// clean-up, which leaves no row, key or job behind; on a database holding
/// keys or rows it did not create, it refuses and changes nothing.
#[tokio::test]
async fn rotation_moves_every_row_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let report = passed(
        bench(&[
            "rotation",
            "--rows",
            "1500",
            "--batch-size",
            "200",
            "--idle-seconds",
            "0.3",
            "--repeats",
            "1",
            "--budgets",
            "2",
            "--budget-seconds",
            "1",
            "--load-rate",
            "200",
        ])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap(),
    );
    assert_lines(
        &report,
        &[
            "wrote 1500 rows",
            "floor: one UPDATE",
            "rotation, no budget",
            "rotation, budget",
            "p99 within the budget in",
            "rotation / floor (median, no budget)",
            "p99 during / idle (median, no budget)",
        ],
    );
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    for table in ["connections", "encryption_keys", "encryption_rotation_jobs"] {
        let left: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(left, 0, "{table} keeps {left} rows of the benchmark");
    }

    // A catalog it did not create: refused, named, and left as it was.
    sqlx::query(
        "INSERT INTO encryption_keys (id, key_id, kms_key_arn, status) \
         VALUES ('k1', 'primary', 'local:primary', 'active')",
    )
    .execute(&db)
    .await
    .unwrap();
    sqlx::query("INSERT INTO connections (id, encryption_key_id) VALUES ('real-row', 'k1')")
        .execute(&db)
        .await
        .unwrap();
    let out = bench(&["rotation", "--rows", "10", "--idle-seconds", "0.1"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("keys primary") && stderr.contains("1 connections rows"),
        "{stderr}"
    );
    let keys: Vec<(String, String)> = sqlx::query_as("SELECT key_id, status FROM encryption_keys")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(keys, [("primary".to_owned(), "active".to_owned())]);
}

/// `throughput --target --token` measures a server that requires
/// authentication (a real `keyward serve` on a database holding a token);
/// without the token every call would be refused.
#[test]
fn throughput_sends_a_token_to_a_server_that_requires_one() {
    let keyward = std::path::Path::new(BIN).with_file_name("keyward");
    assert!(keyward.is_file(), "{} is not built", keyward.display());
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let token = Command::new(&keyward)
        .args([
            "token", "create", "--name", "bench", "--role", "encrypt", "--role", "decrypt",
            "--role", "rewrap",
        ])
        .args(["--audit-log", "off"])
        .env_clear()
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // --dev keeps authentication on: the database holds a token.
    let mut server = Command::new(&keyward)
        .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .env_clear()
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let target = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let args = [
        "throughput",
        "--target",
        &target,
        "--seconds",
        "0.6",
        "--rounds",
        "1",
    ];
    let refused = bench(&args).output().unwrap();
    let with_token = bench(&args).env("KEYWARD_TOKEN", &token).output();
    let _ = server.kill();
    let _ = server.wait();
    assert!(!refused.status.success());
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert!(refusal.contains("no credentials"), "{refusal}");
    assert_lines(&passed(with_token.unwrap()), &["Encrypt", "Decrypt"]);
}

/// `soak`, briefly: a real `keyward serve` child, load, a rotation and the
/// read-back, with zero errors. The child is the `keyward` beside
/// `keyward-bench`, which `cargo test --workspace` (scripts/test) builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_passes() {
    let server = std::path::Path::new(BIN).with_file_name("keyward");
    assert!(
        server.is_file(),
        "{} is not built: run the workspace's tests (cargo test --workspace) or cargo build -p keyward first",
        server.display()
    );
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let report = passed(
        bench(&[
            "soak",
            "--rows",
            "2000",
            "--duration-secs",
            "3",
            "--report-every-secs",
            "1",
            "--concurrency",
            "4",
            // A debug build: the RSS target is for release builds.
            "--max-rss-mib",
            "512",
        ])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap(),
    );
    assert_lines(
        &report,
        &[
            "rows read back and compared                        2000",
            "errors: load calls                                    0",
            "errors: rows that did not read back                   0",
            "soak PASSED",
        ],
    );
}

/// `adopt`, briefly: an application's live table adopted while writers
/// update it; the benchmark checks the adoption finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_a_live_table_reports_the_writers_stall() {
    let Some(url) = fresh_postgres().await else {
        return;
    };
    let report = passed(
        bench(&[
            "adopt",
            "--rows",
            "5000",
            "--writers",
            "2",
            "--idle-seconds",
            "0.5",
        ])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap(),
    );
    assert_lines(
        &report,
        &[
            "5000 application rows written",
            "migrate (adoption) wall time, s",
            "writer longest stall during migrate, ms",
            "writer p99 during / before migrate",
        ],
    );
}
