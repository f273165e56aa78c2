//! A raw worker stream, to play a zombie, misbehaving or reconnecting
//! worker (a copy of the one in control_plane.rs, shared by newer tests).

use std::time::Duration;

use corral::pb;

use super::channel;

pub struct RawWorker {
    pub tx: tokio::sync::mpsc::Sender<pb::WorkerMessage>,
    pub rx: tonic::Streaming<pb::CoordinatorMessage>,
}

impl RawWorker {
    pub async fn connect(url: &str, id: &str, running: Vec<pb::RunningJob>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::Hello(pb::Hello {
                worker_id: id.into(),
                max_concurrent_jobs: 1,
                cache_max_bytes: 1 << 30,
                state: Some(pb::Heartbeat {
                    running_jobs: running,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut client = pb::workers_client::WorkersClient::new(channel(url).await);
        let mut rx = client
            .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = rx.message().await.unwrap().unwrap();
        assert!(matches!(
            first.msg,
            Some(pb::coordinator_message::Msg::Welcome(_))
        ));
        Self { tx, rx }
    }

    pub async fn next_assign(&mut self) -> pb::Assign {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
                .await
                .expect("an assignment within 10 s")
                .unwrap()
                .unwrap();
            if let Some(pb::coordinator_message::Msg::Assign(a)) = m.msg {
                return a;
            }
        }
    }

    /// Returns one image: `png_like(tag)`, which passes the coordinator's
    /// check that results are PNG files.
    pub async fn result(&self, job: &str, attempt: u32, tag: &[u8]) {
        let image = png_like(tag);
        self.tx
            .send(pb::WorkerMessage {
                msg: Some(pb::worker_message::Msg::Result(pb::JobResult {
                    job_id: job.into(),
                    attempt,
                    images: vec![image.into()],
                    timings: None,
                })),
            })
            .await
            .unwrap();
    }
}

/// The PNG signature followed by `tag`: what `RawWorker::result` sends.
pub fn png_like(tag: &[u8]) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend_from_slice(tag);
    v
}

impl RawWorker {
    /// Heartbeats every 100 ms, reporting `running`, until dropped.
    pub fn heartbeat(&self, running: Vec<pb::RunningJob>) {
        let weak = self.tx.downgrade();
        tokio::spawn(async move {
            while let Some(tx) = weak.upgrade() {
                let hb = pb::WorkerMessage {
                    msg: Some(pb::worker_message::Msg::Heartbeat(pb::Heartbeat {
                        running_jobs: running.clone(),
                        ..Default::default()
                    })),
                };
                if tx.send(hb).await.is_err() {
                    return;
                }
                drop(tx);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    pub async fn send(&self, msg: pb::worker_message::Msg) {
        self.tx
            .send(pb::WorkerMessage { msg: Some(msg) })
            .await
            .unwrap();
    }
}
