//! Helpers for the gRPC tests: a server on a loopback port that stops on request.

#![allow(dead_code)]

use std::net::SocketAddr;

use r3map_core::Backend;
use r3map_grpc::GrpcServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

pub async fn serve(server: GrpcServer) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

/// The bytes of a whole backend.
pub async fn contents(backend: &dyn Backend) -> Vec<u8> {
    let mut buf = vec![0u8; backend.size() as usize];
    backend.read_at(0, &mut buf).await.unwrap();
    buf
}
