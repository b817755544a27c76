//! The server `throughput` and `kms-cache` measure when no `--target` is
//! given: `keyward`'s own [`Application`] on a temporary SQLite database
//! with an active local key (the embedded default), in this process.

use keyward::{
    app::{Application, Services},
    config::{KmsSettings, MasterSecrets, Settings},
    crypto::secret::MasterSecret,
};

/// A server on a temporary SQLite database with an active local key,
/// stopped on drop.
pub struct InProcessServer {
    pub url: String,
    pub services: Services,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InProcessServer {
    pub async fn start(kms: KmsSettings) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("bench.db");
        let master = MasterSecrets {
            current: MasterSecret::new(MasterSecret::generate_hex().as_bytes())?,
            previous: vec![],
            legacy: Default::default(),
        };
        let mut settings =
            Settings::for_database(format!("sqlite://{}", db.display()), Some(master));
        settings.seed_dev_key = true;
        settings.kms = kms;
        let app = Application::build(settings).await?;
        let url = format!("http://{}", app.local_addr()?);
        let services = app.services().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            url,
            services,
            _dir: dir,
            stop: Some(stop),
        })
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
