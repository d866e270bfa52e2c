//! The embedded broker's supervisor: one thread per [`DurableBroker`](crate::DurableBroker)
//! that owns the broker process, restarts it when it fails and stops it when asked.
//!
//! A failure is either of:
//! - **the process exited** on its own (killed, crashed, out of memory);
//! - **the process reported a panic** in its output and kept running. Tansu 0.6 runs its
//!   storage on tasks of one runtime, and a panic there (seen under load here: "more or less
//!   than one row" in its idempotent-producer check) leaves the process up but unable to take
//!   another produce, every one failing until it is restarted. A panic is a broker bug whose
//!   damage cannot be judged from outside, so any panic counts.
//!
//! A restart runs the same binary on the same directory and address, so clients reconnect to
//! where they were. Nothing acknowledged is lost: SQLite commits a produce before the broker
//! acknowledges it, and a transaction left open by the failed process is rolled back when the
//! file is opened again. Nothing is doubled: producers are idempotent, and their ids and
//! sequences are in the same file, so a retried batch whose first attempt committed is
//! answered as a duplicate.
//!
//! Restarts back off when the broker fails soon after each start (a crash loop): immediately
//! after a run of [`STABLE_RUN`] or more, then 1 s, doubling to [`MAX_BACKOFF`]. The
//! supervisor never gives up while the pipeline runs; each failure is logged at error level
//! with the broker's last output, and [`Shared::down_reason`] says why it is down meanwhile.

use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        mpsc, Arc, Condvar, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{error, info};

use crate::{tail, BrokerError, Launcher, Process, OUTPUT_FILE};

/// How often the process and its output are checked.
const CHECK_EVERY: Duration = Duration::from_millis(200);
/// A run at least this long resets the restart backoff.
pub const STABLE_RUN: Duration = Duration::from_secs(30);
/// The longest wait between two restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// What a Rust panic writes to stderr (the default panic hook; Tansu installs none).
const PANIC_MARK: &str = "panicked at";
/// What Tansu logs for every request once its storage task is gone: the task that serves all
/// storage stopped (a panic), and no request will succeed again. Watched for as well as the
/// panic because the panic's own lines can be lost: on a full disk, the output file (in the
/// same data directory) cannot take them.
const STORAGE_GONE_MARK: &str = "UnableToSend";
/// How [`OutputWatch`] reports [`STORAGE_GONE_MARK`].
const STORAGE_GONE: &str = "the broker's storage stopped serving";

/// What the supervisor and the [`DurableBroker`](crate::DurableBroker) share.
pub struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    pid: AtomicU32,
    restarts: AtomicU64,
    down: Mutex<Option<String>>,
    /// Told each time the broker goes down (with the reason) or serves again (`None`).
    on_change: Mutex<Option<StatusListener>>,
}

/// What [`DurableBroker::on_status_change`](crate::DurableBroker::on_status_change) registers.
pub type StatusListener = Box<dyn Fn(Option<&str>) + Send + Sync>;

impl Shared {
    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Acquire) {
            0 => None,
            pid => Some(pid),
        }
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Acquire)
    }

    pub fn down_reason(&self) -> Option<String> {
        self.down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn request_stop(&self) {
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    /// Waits up to `timeout` for a stop request; true once one came.
    fn stopped_within(&self, timeout: Duration) -> bool {
        let guard = self.stop.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = self
            .wake
            .wait_timeout_while(guard, timeout, |stop| !*stop)
            .unwrap_or_else(PoisonError::into_inner);
        *guard
    }

    pub(crate) fn set_listener(&self, listener: StatusListener) {
        listener(self.down_reason().as_deref());
        *self
            .on_change
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(listener);
    }

    fn set_down(&self, reason: Option<String>) {
        (*self.down.lock().unwrap_or_else(PoisonError::into_inner)).clone_from(&reason);
        if let Some(listener) = &*self
            .on_change
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            listener(reason.as_deref());
        }
    }
}

/// Starts the supervisor thread, which launches the broker; returns once it listens, or with
/// the reason it did not start.
pub(crate) fn spawn(launcher: Launcher) -> Result<(Arc<Shared>, JoinHandle<()>), BrokerError> {
    let shared = Arc::new(Shared {
        stop: Mutex::new(false),
        wake: Condvar::new(),
        pid: AtomicU32::new(0),
        restarts: AtomicU64::new(0),
        down: Mutex::new(None),
        on_change: Mutex::new(None),
    });
    let (started_tx, started_rx) = mpsc::sync_channel(1);
    let for_thread = shared.clone();
    let handle = std::thread::Builder::new()
        .name("embedded-broker".to_owned())
        .spawn(move || {
            // The process is launched on this thread, which lives as long as the broker is
            // supervised: `--pdeathsig` stops the broker with it (`parent_bound_command`).
            let first = match launcher.launch() {
                Ok(process) => process,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            for_thread.pid.store(first.pid(), Ordering::Release);
            let _ = started_tx.send(Ok(()));
            supervise(&launcher, &for_thread, first);
        })
        .map_err(|source| BrokerError::Io {
            what: "starting the embedded broker's supervisor thread".to_owned(),
            source,
        })?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok((shared, handle)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(BrokerError::Io {
                what: "starting the embedded broker".to_owned(),
                source: std::io::Error::other("its supervisor thread ended before it started"),
            })
        }
    }
}

/// Watches `process` until a stop is requested, restarting it whenever it fails.
fn supervise(launcher: &Launcher, shared: &Shared, mut process: Process) {
    let output = launcher.dir.join(OUTPUT_FILE);
    let mut watch = OutputWatch::new(process.output_from);
    let mut started = Instant::now();
    let mut backoff = Duration::ZERO;
    loop {
        if shared.stopped_within(CHECK_EVERY) {
            shared.pid.store(0, Ordering::Release);
            process.stop(&launcher.dir);
            return;
        }
        let failure = match process.child.try_wait() {
            Ok(Some(status)) => Some(format!("the broker process exited ({status})")),
            Ok(None) | Err(_) => watch.panic_since_last(&output).map(|failure| {
                if failure.starts_with(STORAGE_GONE) {
                    failure
                } else {
                    format!("the broker reported a panic: {failure}")
                }
            }),
        };
        let Some(failure) = failure else { continue };
        let ran = started.elapsed();
        backoff = next_backoff(backoff, ran);
        shared.pid.store(0, Ordering::Release);
        shared.set_down(Some(failure.clone()));
        error!(
            dir = %launcher.dir.display(),
            ran_s = ran.as_secs(),
            restart_in_ms = backoff.as_millis() as u64,
            last_output = %tail(&output, process.output_from),
            "The embedded broker failed: {failure}. Restarting it on its log."
        );
        // A broker that panicked may still hold the port and the file: it goes first.
        process.kill();
        process = loop {
            if shared.stopped_within(backoff) {
                return;
            }
            match launcher.launch() {
                Ok(process) => break process,
                Err(e) => {
                    backoff = next_backoff(backoff, Duration::ZERO);
                    shared.set_down(Some(format!("{failure}; restarting it failed: {e}")));
                    error!(
                        dir = %launcher.dir.display(),
                        error = %e,
                        retry_in_ms = backoff.as_millis() as u64,
                        "Restarting the embedded broker failed."
                    );
                }
            }
        };
        watch = OutputWatch::new(process.output_from);
        started = Instant::now();
        shared.pid.store(process.pid(), Ordering::Release);
        shared.restarts.fetch_add(1, Ordering::AcqRel);
        shared.set_down(None);
        info!(
            dir = %launcher.dir.display(),
            pid = process.pid(),
            restarts = shared.restarts(),
            "The embedded broker is serving its log again."
        );
    }
}

/// The wait before the next restart: none after a stable run, else 1 s, doubling up to
/// [`MAX_BACKOFF`].
fn next_backoff(previous: Duration, ran: Duration) -> Duration {
    if ran >= STABLE_RUN {
        Duration::ZERO
    } else if previous.is_zero() {
        Duration::from_secs(1)
    } else {
        (previous * 2).min(MAX_BACKOFF)
    }
}

/// Reads the broker's output as it grows, a whole line at a time, looking for a panic.
struct OutputWatch {
    /// Where the next read starts: the end of the last whole line read.
    read_to: u64,
    /// A panic line seen at the end of the last read, waiting for its message line.
    pending: Option<String>,
}

impl OutputWatch {
    fn new(from: u64) -> Self {
        Self {
            read_to: from,
            pending: None,
        }
    }

    /// The first panic written since the last call, with its message: the panic line and the
    /// line after it (the default hook writes the location, then the message); or a sign that
    /// the storage task is gone ([`STORAGE_GONE_MARK`]).
    fn panic_since_last(&mut self, output: &Path) -> Option<String> {
        let mut text = String::new();
        let mut file = File::open(output).ok()?;
        file.seek(SeekFrom::Start(self.read_to)).ok()?;
        file.take(1 << 20).read_to_string(&mut text).ok()?;
        let whole = text.rfind('\n').map_or(0, |end| end + 1);
        self.read_to += whole as u64;
        let mut lines = text[..whole].lines();
        if let Some(panic) = self.pending.take() {
            return Some(join_panic(&panic, lines.next()));
        }
        while let Some(line) = lines.next() {
            if line.contains(STORAGE_GONE_MARK) {
                return Some(format!(
                    "{STORAGE_GONE}: every request fails with {STORAGE_GONE_MARK}; \
                     the panic that stopped it may not have reached its output, e.g. on a full \
                     disk"
                ));
            }
            if line.contains(PANIC_MARK) {
                return match lines.next() {
                    Some(message) => Some(join_panic(line, Some(message))),
                    None => {
                        // The message may not be written yet: report it with the next read,
                        // which a panicking broker that keeps running still gets.
                        self.pending = Some(line.to_owned());
                        None
                    }
                };
            }
        }
        None
    }
}

fn join_panic(line: &str, message: Option<&str>) -> String {
    match message {
        Some(message) => format!("{} ({})", message.trim(), line.trim()),
        None => line.trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn backoff_is_none_after_a_stable_run_and_doubles_in_a_crash_loop() {
        assert_eq!(
            next_backoff(Duration::from_secs(8), STABLE_RUN),
            Duration::ZERO
        );
        let mut backoff = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..7 {
            backoff = next_backoff(backoff, Duration::from_secs(2));
            waits.push(backoff.as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn a_panic_is_found_in_output_written_since_the_last_read() {
        let dir = std::env::temp_dir().join(format!("orderflow-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("tansu.log");
        let mut file = File::create(&path).expect("output file");
        writeln!(
            file,
            "thread 'main' panicked at old.rs:1:1:\nan earlier run's panic"
        )
        .expect("write");
        let from = file.metadata().expect("metadata").len();
        let mut watch = OutputWatch::new(from);
        assert_eq!(
            watch.panic_since_last(&path),
            None,
            "an earlier run's panic counts"
        );
        writeln!(file, "2026-11-28T12:00:00Z WARN tansu: slow fetch").expect("write");
        assert_eq!(
            watch.panic_since_last(&path),
            None,
            "a warning is not a panic"
        );
        // The location line alone, then its message in a later write.
        write!(
            file,
            "thread 'tokio-runtime-worker' panicked at tansu-storage/src/lite.rs:503:13:\nmore or"
        )
        .expect("write");
        assert_eq!(
            watch.panic_since_last(&path),
            None,
            "the message is not whole yet"
        );
        writeln!(file, " less than one row").expect("write");
        assert_eq!(
            watch.panic_since_last(&path).as_deref(),
            Some(
                "more or less than one row (thread 'tokio-runtime-worker' panicked at \
                 tansu-storage/src/lite.rs:503:13:)"
            )
        );
        assert_eq!(watch.panic_since_last(&path), None, "reported once");
        // A full disk cut the panic's lines off; what follows shows the storage task is gone.
        writeln!(
            file,
            "2026-11-28T17:43:05Z ERROR tansu_storage::service::produce: 174: otherwise=UnableToSend"
        )
        .expect("write");
        assert!(watch
            .panic_since_last(&path)
            .is_some_and(|failure| failure.starts_with(STORAGE_GONE)));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
