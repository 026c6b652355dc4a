//! Workers: one thread per core, each running its own single-threaded tokio
//! runtime, as Envoy runs its workers. A connection the listeners accept is
//! handed to the worker with the fewest open connections and lives there:
//! its requests, the connections they open to endpoints, and the tasks
//! hyper spawns for them all run on that one thread.
//!
//! Why not tokio's multi-threaded scheduler: with it, the tasks of one
//! connection (the downstream connection, its streams, the upstream
//! HTTP/2 connection) were woken on whichever worker was free, and about
//! 30% of the client sidecar's CPU went to switching threads in the
//! two-worker benchmark (perf: `finish_task_switch`,
//! `_raw_spin_unlock_irqrestore`). Each worker has its own connections to
//! endpoints ([`crate::upstream::Pool`] keeps a slot per worker, picked by
//! [`index`]), so a request never waits on another thread's connection;
//! the cost is a connection per worker and endpoint, as with Envoy.
//!
//! The main thread keeps everything that is not a request: accepting
//! connections, xDS, certificates, DNS refresh and the admin server.
//! Handing a connection over costs an epoll registration on the worker,
//! once per connection. Accepting on the main thread and choosing the
//! least busy worker balances few long-lived connections (two sidecars
//! share one HTTP/2 connection per worker) evenly, which `SO_REUSEPORT`'s
//! hashing does not.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// This thread's worker number; 0 on every thread that is not a worker.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// How many workers share the per-worker state; set once at startup.
static COUNT: OnceLock<usize> = OnceLock::new();

/// The calling thread's worker number, below [`count`].
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// How many per-worker slots shared state keeps: the number of worker
/// threads, or 1 when requests run on the main thread.
pub fn count() -> usize {
    COUNT.get().copied().unwrap_or(1)
}

/// The worker threads; none when requests run on the main thread's runtime
/// (`--workers 1`, or a machine with one core).
pub struct Workers {
    threads: Vec<Worker>,
    /// Where the search for the least busy worker starts, so ties rotate.
    next: AtomicUsize,
}

struct Worker {
    handle: Handle,
    /// Connections handed to this worker and not yet closed.
    open: Arc<AtomicUsize>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Workers {
    /// Starts `n` worker threads (`0` means one per core); with one, none
    /// are started and connections are served where they are accepted.
    /// Call once, before any per-worker state is made.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let n = match n {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let count = if n > 1 { n } else { 1 };
        if COUNT.set(count).is_err() && self::count() != count {
            return Err(std::io::Error::other(
                "the worker count was already set to a different value",
            ));
        }
        let mut threads = Vec::new();
        if n > 1 {
            for i in 0..n {
                threads.push(Worker::start(i)?);
            }
        }
        Ok(Workers {
            threads,
            next: AtomicUsize::new(0),
        })
    }

    /// Serves an accepted connection with `serve` on the least busy worker,
    /// or on this runtime when there are no workers.
    pub fn spawn<S, F>(&self, stream: TcpStream, serve: S)
    where
        S: FnOnce(TcpStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self.least_busy() else {
            tokio::spawn(serve(stream));
            return;
        };
        // The socket leaves this runtime's reactor and joins the worker's,
        // so its readiness wakes the worker directly.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a worker");
                return;
            }
        };
        let open = OpenConnection::new(&worker.open);
        worker.handle.spawn(async move {
            let _open = open;
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!(error = %e, "a worker cannot register a connection"),
            }
        });
    }

    fn least_busy(&self) -> Option<&Worker> {
        let n = self.threads.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| &self.threads[(start + i) % n])
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
    }

    /// Stops the workers, dropping whatever they still run (call after
    /// draining), and waits for their threads.
    pub fn stop(&self) {
        for worker in &self.threads {
            if let Some(stop) = lock(&worker.stop).take() {
                let _ = stop.send(());
            }
        }
        for worker in &self.threads {
            let thread = lock(&worker.thread).take();
            if let Some(thread) = thread
                && thread.join().is_err()
            {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

impl Worker {
    fn start(index: usize) -> std::io::Result<Worker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("remora-worker-{index}"))
            .spawn(move || {
                INDEX.with(|i| i.set(index));
                // Spawned tasks run while the thread waits here.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Worker {
            handle,
            open: Arc::new(AtomicUsize::new(0)),
            stop: Mutex::new(Some(stop)),
            thread: Mutex::new(Some(thread)),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a connection against its worker until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> OpenConnection {
        open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_least_busy_worker_and_run_there() {
        let workers = Workers::start(2).expect("workers start");
        assert_eq!(count(), 2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (ran, mut on) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        let mut seen = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
            let (stream, _) = listener.accept().await.expect("accept");
            let ran = ran.clone();
            // Each connection stays open (reading until the client closes),
            // so the next one goes to the worker with fewer.
            workers.spawn(stream, move |mut stream| async move {
                let thread = std::thread::current().name().map(String::from);
                let _ = ran.send((index(), thread));
                let mut buf = [0u8; 1];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
            });
            seen.push(on.recv().await.expect("the connection ran"));
        }
        let on_worker = |i: usize| {
            let name = format!("remora-worker-{i}");
            seen.iter()
                .filter(|(index, thread)| *index == i && thread.as_deref() == Some(&name))
                .count()
        };
        assert_eq!((on_worker(0), on_worker(1)), (2, 2), "{seen:?}");
        drop(clients);
        workers.stop();
    }
}
