//! A small TCP fault proxy on a free local port: forwards to an upstream
//! until `cut`, which drops every open connection and refuses new ones
//! until `restore`. Started with [`FaultProxy::start_keeping_upstream`], it
//! keeps the upstream side of a connection open after its client died (no
//! FIN reaches the server): what a host that dies or is partitioned away
//! looks like to Postgres. [`FaultProxy::freeze_transactions`] makes a
//! connection go silent as a transaction starts on it (what a partition
//! mid-transaction looks like to the client: no answer and no reset).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct FaultProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Bumped on every cut: connections of an older generation close.
    generation: watch::Sender<u64>,
    task: JoinHandle<()>,
    /// Upstream sides whose client is gone, kept open.
    zombies: Arc<std::sync::Mutex<Vec<OwnedWriteHalf>>>,
    freeze: Arc<Freeze>,
}

/// Connections silenced by `freeze_transactions`, and how many of them
/// their client has given up on (closed).
#[derive(Default)]
struct Freeze {
    armed: AtomicBool,
    frozen: AtomicUsize,
    released: AtomicUsize,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::launch(upstream, false).await
    }

    /// A proxy that never closes the upstream side of a connection when
    /// its client goes away.
    pub async fn start_keeping_upstream(upstream: SocketAddr) -> Self {
        Self::launch(upstream, true).await
    }

    /// How many upstream connections outlive their client now.
    pub fn zombies(&self) -> usize {
        self.zombies.lock().unwrap().len()
    }

    /// From now until `thaw`: a connection whose client starts a
    /// transaction (sends `BEGIN`) forwards that, then nothing more either
    /// way; it stays open until its client closes it.
    pub fn freeze_transactions(&self) {
        self.freeze.armed.store(true, Ordering::SeqCst);
    }

    /// Connections start transactions normally again (those frozen stay so).
    pub fn thaw(&self) {
        self.freeze.armed.store(false, Ordering::SeqCst);
    }

    /// Connections frozen so far, and how many of them their client closed.
    pub fn frozen(&self) -> (usize, usize) {
        (
            self.freeze.frozen.load(Ordering::SeqCst),
            self.freeze.released.load(Ordering::SeqCst),
        )
    }

    async fn launch(upstream: SocketAddr, keep_upstream: bool) -> Self {
        let zombies: Arc<std::sync::Mutex<Vec<OwnedWriteHalf>>> = Default::default();
        let freeze: Arc<Freeze> = Default::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let task = {
            let cut = cut.clone();
            let generation = generation.clone();
            let zombies = zombies.clone();
            let freeze = freeze.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let mut changed = generation.subscribe();
                    let zombies = zombies.clone();
                    let freeze = freeze.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        if keep_upstream {
                            keep(client, server, zombies).await;
                            return;
                        }
                        tokio::select! {
                            _ = forward(&mut client, &mut server, &freeze) => {}
                            _ = changed.changed() => {}
                        }
                    });
                }
            })
        };
        Self {
            addr,
            cut,
            generation,
            task,
            zombies,
            freeze,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
        self.zombies.lock().unwrap().clear();
    }
}

/// Forwards both ways; when the client goes, the upstream side stays open
/// (parked in `zombies`, its replies read and dropped) until the server
/// itself ends it.
async fn keep(
    client: TcpStream,
    server: TcpStream,
    zombies: Arc<std::sync::Mutex<Vec<OwnedWriteHalf>>>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut client_alive = true;
        while let Ok(n) = server_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if client_alive && client_write.write_all(&buf[..n]).await.is_err() {
                client_alive = false;
            }
        }
    });
    // No shutdown of the upstream write side at the client's end: no FIN.
    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    zombies.lock().unwrap().push(server_write);
    let _ = down.await;
}

/// Forwards both ways until either side ends, or until the client starts a
/// transaction while `freeze` is armed: then the connection goes silent
/// (its client is only watched, to count when it gives up).
async fn forward(client: &mut TcpStream, server: &mut TcpStream, freeze: &Freeze) {
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut buf = vec![0u8; 16 * 1024];
    let up = async {
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            let freezes =
                freeze.armed.load(Ordering::SeqCst) && buf[..n].windows(5).any(|w| w == b"BEGIN");
            if server_write.write_all(&buf[..n]).await.is_err() {
                return false;
            }
            if freezes {
                return true;
            }
        }
    };
    let down = tokio::io::copy(&mut server_read, &mut client_write);
    let frozen = tokio::select! {
        frozen = up => frozen,
        _ = down => false,
    };
    if frozen {
        freeze.frozen.fetch_add(1, Ordering::SeqCst);
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(n) = client_read.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
        freeze.released.fetch_add(1, Ordering::SeqCst);
    }
}
