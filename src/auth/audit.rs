//! The audit log: one JSON line per Decrypt (each batch item), key change,
//! rotation start / cancel / requeue and refused call, with who, what key,
//! what context and the result. Never plaintext, data keys or tokens.
//!
//! Fail-closed by default, as Vault's audit devices are: when an event
//! cannot be written, the request it records fails (UNAVAILABLE) instead of
//! going unaudited, and [`AuditLog::writable`] turns false so health can
//! send traffic elsewhere until a write succeeds again. `--audit-fail-open`
//! logs a warning and lets it pass.
//!
//! Each event is one `write` of its whole line to a file opened with
//! `O_APPEND` (other keyward processes, the CLI, may append to the same
//! file; it is never truncated). After a short or failed write, the next
//! event starts with a newline, so a reader resynchronises on the line
//! after the broken one. Refusals of calls that never reached a handler
//! are bounded by [`super::refusals`].

use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::refusals::{truncate_path, RefusalThrottle, Sender, Summary, Verdict};
use crate::crypto::context::EncryptionContext;

/// The window over which refusals are grouped (see `auth::refusals`).
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(1);
/// Most senders whose refusals are written individually per window.
const REFUSAL_SENDERS_PER_WINDOW: usize = 64;

/// Where audit events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    /// Not written at all.
    Off,
    /// Standard output (logs go to standard error).
    Stdout,
    /// Standard error (for commands whose output is on standard output).
    Stderr,
    /// Appended to a file.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub sink: AuditSink,
    /// Refuse a request whose event cannot be written.
    pub fail_closed: bool,
    /// The permissions a new audit file is created with (whatever the
    /// umask); `0o600` unless a group of operators is to read it.
    pub file_mode: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            sink: AuditSink::Off,
            fail_closed: true,
            file_mode: 0o600,
        }
    }
}

/// Opens `path` for appending, creating it with exactly `mode` (the
/// umask does not widen or narrow it: the file is chmod-ed after creation).
fn open_append(path: &std::path::Path, mode: u32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    match std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(file) => {
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            Ok(file)
        }
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let file = std::fs::OpenOptions::new().append(true).open(path)?;
            let meta = file.metadata()?;
            let existing = meta.permissions().mode() & 0o777;
            if meta.is_file() && existing & !mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{existing:o}"), wanted = format!("{mode:o}"), "the audit log is readable by more users than --audit-file-mode allows; chmod it");
            }
            Ok(file)
        }
        Err(err) => Err(err),
    }
}

/// An event could not be written and the log is fail-closed.
#[derive(Debug, thiserror::Error)]
#[error("the audit log cannot be written, so the request was refused (fail-closed): {0}")]
pub struct AuditError(String);

/// One audited action.
#[derive(Debug, Default, Clone)]
pub struct AuditEvent<'a> {
    pub principal: &'a str,
    /// The gRPC method, e.g. `keyward.v1.Crypto/Decrypt`.
    pub rpc: &'a str,
    /// The key record (`key_id`, or the `id` an envelope names).
    pub key_id: Option<&'a str>,
    pub context: Option<&'a EncryptionContext>,
    /// `ok`, or the gRPC code name of the failure.
    pub result: &'a str,
    pub peer: Option<String>,
    /// What else identifies the action (a job id, `force`).
    pub detail: Option<String>,
}

#[derive(serde::Serialize)]
struct Line<'a> {
    time: String,
    principal: &'a str,
    rpc: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<BTreeMap<&'a str, &'a str>>,
    result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    /// How many calls a summary of refusals stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
}

/// The sink, with whether its last write was cut short.
struct LineWriter {
    out: Box<dyn Write + Send>,
    /// The last write failed or was short: the file may end inside a line,
    /// so the next event starts with a newline.
    resync: bool,
}

impl LineWriter {
    /// Writes `line` (which ends in a newline) with one `write` call, never
    /// retrying the rest of a short write: with other writers appending
    /// to the same file, a retried tail could land after their lines.
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let mut buffer;
        let bytes = if self.resync {
            buffer = Vec::with_capacity(line.len() + 1);
            buffer.push(b'\n');
            buffer.extend_from_slice(line);
            &buffer[..]
        } else {
            line
        };
        let result = match self.out.write(bytes) {
            Ok(n) if n == bytes.len() => self.out.flush(),
            Ok(n) => Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write: {n} of {} bytes", bytes.len()),
            )),
            Err(err) => Err(err),
        };
        self.resync = result.is_err();
        result
    }
}

pub struct AuditLog {
    writer: Option<Mutex<LineWriter>>,
    /// The file and its mode, for [`AuditLog::reopen`].
    file: Option<(PathBuf, u32)>,
    fail_closed: bool,
    written: AtomicU64,
    failed: AtomicU64,
    /// False from a failed write until the next successful one.
    writable: watch::Sender<bool>,
    refusals: Mutex<RefusalThrottle>,
}

impl AuditLog {
    /// Opens the sink (a file is created if missing and appended to).
    pub fn open(settings: &AuditSettings) -> std::io::Result<Self> {
        let writer: Option<Box<dyn Write + Send>> = match &settings.sink {
            AuditSink::Off => None,
            AuditSink::Stdout => Some(Box::new(std::io::stdout())),
            AuditSink::Stderr => Some(Box::new(std::io::stderr())),
            AuditSink::File(path) => Some(Box::new(open_append(path, settings.file_mode)?)),
        };
        let file = match &settings.sink {
            AuditSink::File(path) => Some((path.clone(), settings.file_mode)),
            _ => None,
        };
        Ok(Self {
            file,
            ..Self::with_writer(writer, settings.fail_closed)
        })
    }

    /// Opens the audit file again by its path (SIGHUP; after logrotate
    /// renamed it, events go to a new file at the path) and writes a
    /// `reopened` event there. `Ok(false)` when the log is no file; on an
    /// error the file in use stays.
    pub fn reopen(&self) -> std::io::Result<bool> {
        let (Some(writer), Some((path, mode))) = (&self.writer, &self.file) else {
            return Ok(false);
        };
        let file = open_append(path, *mode)?;
        *writer.lock().unwrap_or_else(PoisonError::into_inner) = LineWriter {
            out: Box::new(file),
            resync: false,
        };
        let _ = self.record(&AuditEvent {
            principal: "keyward",
            rpc: "keyward/audit",
            result: "reopened",
            ..AuditEvent::default()
        });
        Ok(true)
    }

    /// A log over any writer (tests inject failing ones).
    pub fn with_writer(writer: Option<Box<dyn Write + Send>>, fail_closed: bool) -> Self {
        Self {
            writer: writer.map(|out| Mutex::new(LineWriter { out, resync: false })),
            file: None,
            fail_closed,
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            writable: watch::Sender::new(true),
            refusals: Mutex::new(RefusalThrottle::new(
                REFUSAL_WINDOW,
                REFUSAL_SENDERS_PER_WINDOW,
            )),
        }
    }

    /// A log that writes nothing.
    pub fn off() -> Self {
        Self::with_writer(None, false)
    }

    /// Whether requests can be served: false while a fail-closed log
    /// cannot be written (every audited request would be refused). Health
    /// follows it.
    pub fn writable(&self) -> watch::Receiver<bool> {
        self.writable.subscribe()
    }

    /// Events written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Events that could not be written (refused requests when fail-closed,
    /// lost events when fail-open).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Runs an audited change: `event` with result `requested` first
    /// (fail-closed: when it cannot be written, `change` does not run and
    /// the error is returned), then with the result `outcome` names (best
    /// effort: the change is done by then). The API and the operator
    /// commands audit their changes through this one sequence.
    pub async fn audit_change<T, E>(
        &self,
        event: AuditEvent<'_>,
        outcome: impl FnOnce(&Result<T, E>) -> &'static str,
        change: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<Result<T, E>, AuditError> {
        self.record(&AuditEvent {
            result: "requested",
            ..event.clone()
        })?;
        let result = change.await;
        let rpc = event.rpc;
        let done = AuditEvent {
            result: outcome(&result),
            ..event
        };
        if let Err(err) = self.record(&done) {
            tracing::warn!(error = %err, rpc, "audit outcome event lost");
        }
        Ok(result)
    }

    /// Writes one event; an error only when writing failed and the log is
    /// fail-closed.
    pub fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        self.write_event(event, None)
    }

    /// Records a call refused before it reached a handler (authentication,
    /// role, rate limit), bounded as `auth::refusals` describes: the path
    /// truncated, repeats of one sender within a window counted into one
    /// summary. Best effort: a refusal is refused whether or not its event
    /// is written.
    pub fn record_refusal(&self, event: &AuditEvent<'_>, ip: Option<IpAddr>) {
        if self.writer.is_none() {
            return;
        }
        let rpc = truncate_path(event.rpc);
        let sender = Sender {
            principal: event.principal.to_owned(),
            ip,
            result: event.result.to_owned(),
        };
        let (verdict, closed) = self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(Instant::now(), sender, &rpc);
        self.write_summaries(closed);
        if verdict == Verdict::Write {
            let _ = self.write_event(
                &AuditEvent {
                    rpc: &rpc,
                    ..event.clone()
                },
                None,
            );
        }
    }

    /// Called about once per [`REFUSAL_WINDOW`]: writes the counts of a
    /// window of refusals that is over, and while the log is not writable,
    /// tries to write again (an event saying how many were lost), so health
    /// turns SERVING once the sink recovers.
    pub fn upkeep(&self) {
        let closed = self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .close_if_over(Instant::now());
        self.write_summaries(closed);
        if !*self.writable.borrow() {
            let detail = format!(
                "the audit log is writable again; {} events could not be written so far",
                self.failed()
            );
            // Not counted: a retry is no event of its own until it works.
            let recovery = AuditEvent {
                principal: "keyward",
                rpc: "keyward/audit",
                result: "recovered",
                detail: Some(detail),
                ..AuditEvent::default()
            };
            if self.write_line(&recovery, None).is_ok() {
                self.written.fetch_add(1, Ordering::Relaxed);
                tracing::info!("the audit log is writable again");
            }
        }
    }

    fn write_summaries(&self, summaries: Vec<Summary>) {
        for summary in summaries {
            let (event, count) = match &summary {
                Summary::Repeated { sender, rpc, count } => (
                    AuditEvent {
                        principal: &sender.principal,
                        rpc,
                        result: &sender.result,
                        peer: sender.ip.map(|ip| ip.to_string()),
                        detail: Some(format!(
                            "{count} more refusals from this sender within {}s (not written one by one)",
                            REFUSAL_WINDOW.as_secs_f64()
                        )),
                        ..AuditEvent::default()
                    },
                    *count,
                ),
                Summary::Overflow { count, senders } => (
                    AuditEvent {
                        principal: "unauthenticated",
                        rpc: "*",
                        result: "refused",
                        detail: Some(format!(
                            "{count} refusals from {senders} further senders within {}s (over the budget of senders written one by one)",
                            REFUSAL_WINDOW.as_secs_f64()
                        )),
                        ..AuditEvent::default()
                    },
                    *count,
                ),
            };
            let _ = self.write_event(&event, Some(count));
        }
    }

    /// Writes one event and counts it as written or failed.
    fn write_event(&self, event: &AuditEvent<'_>, count: Option<u64>) -> Result<(), AuditError> {
        let written = self.write_line(event, count);
        let counter = if written.is_ok() {
            &self.written
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match written {
            Ok(()) => Ok(()),
            Err(err) if self.fail_closed => Err(AuditError(err.to_string())),
            Err(err) => {
                tracing::warn!(error = %err, rpc = event.rpc, "audit event lost (fail-open)");
                Ok(())
            }
        }
    }

    /// Serialises and writes one event, and updates [`Self::writable`].
    fn write_line(&self, event: &AuditEvent<'_>, count: Option<u64>) -> std::io::Result<()> {
        let Some(writer) = &self.writer else {
            return Ok(());
        };
        let line = Line {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            principal: event.principal,
            rpc: event.rpc,
            key_id: event.key_id,
            context: event.context.map(|c| c.iter().collect()),
            result: event.result,
            peer: event.peer.as_deref(),
            detail: event.detail.as_deref(),
            count,
        };
        let written = serde_json::to_vec(&line)
            .map_err(std::io::Error::other)
            .and_then(|mut bytes| {
                bytes.push(b'\n');
                writer
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write_line(&bytes)
            });
        // Only a fail-closed log refuses requests; that is what health
        // must tell load balancers.
        let writable = written.is_ok() || !self.fail_closed;
        self.writable.send_if_modified(|current| {
            let changed = *current != writable;
            *current = writable;
            changed
        });
        written
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_reopen_after_a_rename_writes_to_a_new_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&AuditSettings {
            sink: AuditSink::File(path.clone()),
            file_mode: 0o640,
            ..AuditSettings::default()
        })
        .unwrap();
        let event = |rpc| AuditEvent {
            principal: "app",
            rpc,
            result: "ok",
            ..AuditEvent::default()
        };
        log.record(&event("before")).unwrap();
        // logrotate: rename, then signal.
        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        assert!(log.reopen().unwrap());
        log.record(&event("after")).unwrap();

        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(
            old.contains("\"before\"") && !old.contains("after"),
            "{old}"
        );
        let lines: Vec<&str> = new.lines().collect();
        assert_eq!(lines.len(), 2, "{new}");
        assert!(lines[0].contains("\"reopened\""), "{new}");
        assert!(lines[1].contains("\"after\""), "{new}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o640);

        // A path that cannot be opened keeps the file in use.
        std::fs::rename(&path, &rotated).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(log.reopen().is_err());
        log.record(&event("kept")).unwrap();
        assert!(std::fs::read_to_string(&rotated).unwrap().contains("kept"));
        assert!(!AuditLog::off().reopen().unwrap());
    }

    #[test]
    fn events_are_json_lines_and_failures_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&AuditSettings {
            sink: AuditSink::File(path.clone()),
            ..AuditSettings::default()
        })
        .unwrap();
        let ctx = EncryptionContext::from_pairs([("tenant", "acme")]).unwrap();
        log.record(&AuditEvent {
            principal: "app",
            rpc: "keyward.v1.Crypto/Decrypt",
            key_id: Some("k1"),
            context: Some(&ctx),
            result: "ok",
            ..AuditEvent::default()
        })
        .unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(value["principal"], "app");
        assert_eq!(value["context"]["tenant"], "acme");
        assert!(value.get("peer").is_none());

        let full = AuditSettings {
            sink: AuditSink::File("/dev/full".into()),
            ..AuditSettings::default()
        };
        let event = AuditEvent {
            principal: "app",
            rpc: "x",
            result: "ok",
            ..AuditEvent::default()
        };
        assert!(AuditLog::open(&full).unwrap().record(&event).is_err());
        let open = AuditSettings {
            fail_closed: false,
            ..full
        };
        assert!(AuditLog::open(&open).unwrap().record(&event).is_ok());
    }

    /// A file that fails the way a full disk does: the first write is cut
    /// short, the second fails, later ones succeed.
    #[derive(Clone, Default)]
    struct FillingDisk {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
    }

    impl Write for FillingDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut bytes = self.bytes.lock().unwrap();
            match self.writes.fetch_add(1, Ordering::SeqCst) {
                1 => {
                    bytes.extend_from_slice(&buf[..buf.len() / 2]);
                    Ok(buf.len() / 2)
                }
                2 => Err(std::io::Error::other("no space left on device")),
                _ => {
                    bytes.extend_from_slice(buf);
                    Ok(buf.len())
                }
            }
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn decrypt_event(principal: &str) -> AuditEvent<'_> {
        AuditEvent {
            principal,
            rpc: "keyward.v1.Crypto/Decrypt",
            result: "ok",
            ..AuditEvent::default()
        }
    }

    #[test]
    fn after_a_short_write_the_next_event_starts_on_a_line_of_its_own() {
        let disk = FillingDisk::default();
        let log = AuditLog::with_writer(Some(Box::new(disk.clone())), true);
        let mut writable = log.writable();
        log.record(&decrypt_event("first")).unwrap();
        assert!(log.record(&decrypt_event("cut-short")).is_err());
        assert!(
            !*writable.borrow_and_update(),
            "a failed write must turn health off"
        );
        assert!(log.record(&decrypt_event("failed")).is_err());
        log.record(&decrypt_event("after-recovery")).unwrap();
        assert!(*writable.borrow_and_update());
        log.record(&decrypt_event("next")).unwrap();
        assert_eq!((log.written(), log.failed()), (3, 2));

        // One write per event: the file holds the first line, half a line,
        // then every later event whole on its own line.
        assert_eq!(disk.writes.load(Ordering::SeqCst), 5);
        let text = String::from_utf8(disk.bytes.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let parsed: Vec<serde_json::Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let principals: Vec<&str> = parsed
            .iter()
            .map(|v| v["principal"].as_str().unwrap())
            .collect();
        assert_eq!(principals, ["first", "after-recovery", "next"], "{text}");
        assert!(lines[1].starts_with(r#"{"time""#) && !lines[1].ends_with('}'));
    }

    #[test]
    fn an_unwritable_log_recovers_on_upkeep() {
        let disk = FillingDisk::default();
        // Two writes that go wrong, then the disk has room again.
        disk.writes.store(1, Ordering::SeqCst);
        let log = AuditLog::with_writer(Some(Box::new(disk.clone())), true);
        let writable = log.writable();
        assert!(log.record(&decrypt_event("a")).is_err());
        log.upkeep(); // the failing write
        assert!(!*writable.borrow());
        log.upkeep();
        assert!(*writable.borrow());
        let text = String::from_utf8(disk.bytes.lock().unwrap().clone()).unwrap();
        let recovered: serde_json::Value =
            serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(recovered["result"], "recovered");
        assert_eq!((log.written(), log.failed()), (1, 1));
    }

    #[test]
    fn a_fail_open_log_stays_writable_for_health() {
        let disk = FillingDisk::default();
        disk.writes.store(2, Ordering::SeqCst);
        let log = AuditLog::with_writer(Some(Box::new(disk)), false);
        assert!(log.record(&decrypt_event("lost")).is_ok());
        assert!(*log.writable().borrow());
        assert_eq!(log.failed(), 1);
    }

    #[test]
    fn a_flood_of_refusals_writes_one_event_and_one_count() {
        let disk = FillingDisk::default();
        disk.writes.store(3, Ordering::SeqCst);
        let log = AuditLog::with_writer(Some(Box::new(disk.clone())), true);
        let path = format!("/{}", "a".repeat(3900));
        let ip = Some(IpAddr::from([127, 0, 0, 1]));
        for _ in 0..20_000 {
            log.record_refusal(
                &AuditEvent {
                    principal: "unauthenticated",
                    rpc: &path,
                    result: "UNAUTHENTICATED",
                    peer: Some("127.0.0.1:5000".into()),
                    ..AuditEvent::default()
                },
                ip,
            );
        }
        let closed = log
            .refusals
            .lock()
            .unwrap()
            .close_if_over(Instant::now() + REFUSAL_WINDOW);
        log.write_summaries(closed);
        let text = String::from_utf8(disk.bytes.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0]["rpc"].as_str().unwrap().len() < 200);
        assert_eq!(lines[1]["count"], 19_999);
        assert!(text.len() < 1024, "{}", text.len());
    }
}
