//! The audit log: one JSON line per Decrypt (each batch item), key change,
//! rotation start / cancel / requeue and refused call, with who, what key,
//! what context and the result. Never plaintext, data keys or tokens.
//!
//! Fail-closed by default, as Vault's audit devices are: when an event
//! cannot be written, the request it records fails (UNAVAILABLE) instead of
//! going unaudited. `--audit-fail-open` logs a warning and lets it pass.

use std::{
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
};

use crate::crypto::context::EncryptionContext;

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
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            sink: AuditSink::Off,
            fail_closed: true,
        }
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
}

pub struct AuditLog {
    writer: Option<Mutex<Box<dyn Write + Send>>>,
    fail_closed: bool,
    written: AtomicU64,
    failed: AtomicU64,
}

impl AuditLog {
    /// Opens the sink (a file is created if missing and appended to).
    pub fn open(settings: &AuditSettings) -> std::io::Result<Self> {
        let writer: Option<Box<dyn Write + Send>> = match &settings.sink {
            AuditSink::Off => None,
            AuditSink::Stdout => Some(Box::new(std::io::stdout())),
            AuditSink::Stderr => Some(Box::new(std::io::stderr())),
            AuditSink::File(path) => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
        };
        Ok(Self {
            writer: writer.map(Mutex::new),
            fail_closed: settings.fail_closed,
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// A log that writes nothing.
    pub fn off() -> Self {
        Self {
            writer: None,
            fail_closed: false,
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
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
        };
        let written = serde_json::to_vec(&line)
            .map_err(std::io::Error::other)
            .and_then(|mut bytes| {
                bytes.push(b'\n');
                let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
                writer.write_all(&bytes)?;
                writer.flush()
            });
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines_and_failures_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&AuditSettings {
            sink: AuditSink::File(path.clone()),
            fail_closed: true,
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
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(value["principal"], "app");
        assert_eq!(value["context"]["tenant"], "acme");
        assert!(value.get("peer").is_none());

        let full = AuditSettings {
            sink: AuditSink::File("/dev/full".into()),
            fail_closed: true,
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
}
