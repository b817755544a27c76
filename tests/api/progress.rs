//! WatchRotation fans out from one reader per job per process: many
//! dashboards on one job cost the database what one does.

use futures::StreamExt as _;
use keyward::api::proto::{
    admin_client::AdminClient, CancelRotationRequest, RotationStatus, WatchRotationRequest,
};

use crate::{
    helpers::{spawn_with, Backend, Options},
    rotation::{activate_new_key, start},
};

const WATCHERS: usize = 500;

/// 500 streams on one job (over two connections: 256 streams each at
/// most): the job row is read about 5 times a second however many watch,
/// opening them reads it once, and every stream sees the job end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_watchers_share_one_reader() {
    let options = Options {
        worker: None,
        ..Options::default()
    };
    let app = spawn_with(Backend::Sqlite, options).await.unwrap();
    activate_new_key(&app, "next").await;
    let job = start(&app, Default::default()).await;
    let hub = std::sync::Arc::clone(app.services.rotations.progress());
    let second = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let clients = [app.admin.clone(), AdminClient::new(second)];

    let before = hub.reads();
    let mut streams = Vec::with_capacity(WATCHERS);
    for i in 0..WATCHERS {
        let mut client = clients[i % 2].clone();
        let request = WatchRotationRequest {
            job_id: job.clone(),
        };
        let mut stream = client.watch_rotation(request).await.unwrap().into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.job.unwrap().status, RotationStatus::Pending as i32);
        streams.push(stream);
    }
    let opened = hub.reads() - before;
    assert!(
        opened <= 3,
        "opening {WATCHERS} streams read the job {opened} times"
    );

    let started = std::time::Instant::now();
    let at_start = hub.reads();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let reads = hub.reads() - at_start;
    let per_second = reads as f64 / started.elapsed().as_secs_f64();
    assert!(
        per_second <= 10.0,
        "{WATCHERS} watchers read the job {per_second:.1} times a second"
    );

    app.admin
        .clone()
        .cancel_rotation(CancelRotationRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap();
    for stream in &mut streams {
        let mut last = None;
        while let Some(event) = stream.next().await {
            last = Some(event.unwrap().job.unwrap().status);
        }
        assert_eq!(last, Some(RotationStatus::Cancelled as i32));
    }
    eprintln!(
        "{WATCHERS} watchers: {opened} reads to open, {per_second:.1} reads/s while they watched"
    );
}
