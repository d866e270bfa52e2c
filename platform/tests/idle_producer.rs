//! An idle producer's polling thread sleeps: it does not spin, it wakes seldom, and dropping
//! the producer ends its wait at once.
//!
//! Every `FutureProducer` runs a polling thread (rdkafka's `ThreadedProducer`). rdkafka 0.39
//! called `poll(100 ms)` in a loop and rounded the last fraction of a millisecond of each wait
//! down to a 0 ms poll, spinning on the clock until the deadline passed: about 1 % of a core per
//! idle producer, eight of them in `orderflow dev`. Without the spin, ten wake-ups a second per
//! producer were still a fifth of an idle `dev`'s CPU. The workspace builds a patched rdkafka
//! (vendor/rdkafka/PATCH.md): timeouts round up, and the thread waits for one event at a time
//! for up to 10 s, woken by the producer's drop. This test holds one producer idle for a few
//! seconds and reads its polling thread's CPU time and wake-ups from the kernel, then drops it
//! and waits for the thread to end well before a 10 s wait would: it fails if the thread spins
//! or polls on a short timer again, or if the drop no longer wakes it.
//!
//! Its own test binary: it counts the process's polling threads, so no other test may make one.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use orderflow_platform::{
    config::Overrides,
    kafka::{KafkaClients, MockBroker},
    Settings,
};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// rdkafka's name for the thread, as the kernel keeps it (15 bytes).
const POLLING_THREAD: &str = "producer pollin";

/// How long the producer is held idle. The window is the measurement, not a wait for a
/// condition: idle CPU is a rate.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

/// The CPU the polling thread may use in [`IDLE_WINDOW`]: 0.25 % of it. Thirty wake-ups cost
/// well under a millisecond; the spin cost 0.5–1 ms per 100 ms wait, 15–30 ms here.
const IDLE_BUDGET: Duration = Duration::from_micros(7_500);

/// The threads of this process that rdkafka named as producer polling threads.
fn polling_threads() -> Vec<PathBuf> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .map(|task| task.path())
        .filter(|task| {
            std::fs::read_to_string(task.join("comm"))
                .is_ok_and(|comm| comm.trim_end() == POLLING_THREAD)
        })
        .collect()
}

/// How often a thread went to sleep and was woken: its voluntary context switches.
fn wake_ups(task: &Path) -> u64 {
    let path = task.join("status");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("{} counts no context switches", path.display()))
}

/// The time a thread has spent on a CPU: the first field of its `schedstat`, in nanoseconds.
fn cpu_time(task: &Path) -> Duration {
    let path = task.join("schedstat");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let nanos = text
        .split_whitespace()
        .next()
        .and_then(|field| field.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{} holds no CPU time: {text:?}", path.display()));
    Duration::from_nanos(nanos)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_producer_polling_thread_sleeps_instead_of_spinning() {
    if !Path::new("/proc/self/task").exists() {
        eprintln!("skipped: this system has no /proc/self/task to read thread CPU times from");
        return;
    }
    let broker = MockBroker::start(1).expect("the in-process mock cluster starts");
    broker
        .cluster()
        .create_topic("idle", 1, 1)
        .expect("the topic is created");
    let settings = Settings::load(None, &Overrides::default()).expect("default settings load");
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap_servers());
    assert!(
        polling_threads().is_empty(),
        "no producer exists before this test makes one"
    );
    let config = clients.idempotent_producer("idle-test");
    // No statistics events (only `stats_producer` asks for them): nothing but a delivery or
    // the drop's wake may end a wait.
    assert_eq!(config.get("statistics.interval.ms"), None);
    let producer: FutureProducer = config.create().expect("the producer is created");

    // One record there and back: the producer is connected and its delivery reports flow, so
    // what follows is the idle state, not start-up.
    producer
        .send(
            FutureRecord::to("idle").key("k").payload("v"),
            Duration::from_secs(10),
        )
        .await
        .expect("the record is delivered");

    let threads = polling_threads();
    assert_eq!(threads.len(), 1, "one producer has one polling thread");
    let thread = &threads[0];
    let before = cpu_time(thread);
    let woken_before = wake_ups(thread);
    tokio::time::sleep(IDLE_WINDOW).await;
    let used = cpu_time(thread).saturating_sub(before);
    let woken = wake_ups(thread) - woken_before;
    eprintln!(
        "the idle polling thread used {used:?} of CPU in {IDLE_WINDOW:?}, woken {woken} times"
    );
    assert!(
        used < IDLE_BUDGET,
        "the idle producer's polling thread used {used:?} of CPU in {IDLE_WINDOW:?} (budget \
         {IDLE_BUDGET:?}): it spins at the end of each poll wait; is the patched rdkafka \
         (vendor/rdkafka) still in place?"
    );
    // Nothing arrives; a poll every 100 ms would be 30 wake-ups.
    assert!(
        woken <= 3,
        "the idle producer's polling thread woke {woken} times in {IDLE_WINDOW:?}: it polls \
         on a short timer again; is the patched rdkafka (vendor/rdkafka) still in place?"
    );

    // The drop wakes the thread and joins it: no 10 s wait. The drop blocks, so off the
    // runtime, with a deadline far below that wait.
    let dropped = tokio::task::spawn_blocking(move || drop(producer));
    tokio::time::timeout(Duration::from_secs(5), dropped)
        .await
        .expect(
            "dropping the producer waited out its polling thread's wait: the drop no longer \
             wakes it (vendor/rdkafka, ThreadedProducer::drop)",
        )
        .expect("the drop does not panic");
    assert!(
        polling_threads().is_empty(),
        "the polling thread ended with its producer"
    );
}
