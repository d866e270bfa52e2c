//! Exit statuses a supervisor (Kubernetes, systemd) can trust: a role that cannot drain exits
//! non-zero, naming what hung, within the drain deadline — even when the broker has stopped
//! answering and librdkafka's calls block; a clean stop exits 0. The meaning of each task's end
//! (failure, panic, stopping unasked, a drain past its deadline) is unit-tested with the
//! supervisor (`cli/src/supervisor.rs`); this runs the real process against a real broker.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use orderflow_testkit::{apply_topics, free_port, test_settings, Broker};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// `orderflow process` on `bootstrap`, its operations listener on `ops`.
fn start_process(bootstrap: &str, ops: u16) -> Child {
    Command::new(BIN)
        .args([
            "--kafka-brokers",
            bootstrap,
            "--set",
            &format!("telemetry.listen=\"127.0.0.1:{ops}\""),
            // Never called: no order flows in these tests.
            "--set",
            "payment.gateway_url=\"http://127.0.0.1:9\"",
            "process",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("orderflow process starts")
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Waits until `/readyz` answers 200: every processor joined its group and restored its state.
async fn wait_ready(child: &mut Child, ops: u16) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("orderflow process exited before it was ready: {status}");
        }
        let ready = client
            .get(format!("http://127.0.0.1:{ops}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for the exit (failing the test after `within`) and returns its status and stderr.
fn wait_exit(mut child: Child, within: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use std::io::Read as _;
                let _ = pipe.read_to_string(&mut stderr);
            }
            return (status, stderr);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("orderflow process did not exit within {within:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_exits_zero() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    apply_topics(&broker, &test_settings(None)).await;
    let ops = free_port();
    let mut child = start_process(&broker.bootstrap(), ops);
    wait_ready(&mut child, ops).await;
    signal(child.id(), "TERM");
    let (status, stderr) = wait_exit(child, Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
}

/// The broker is frozen (SIGSTOP) under a running `orderflow process`, then the process is
/// told to stop: its processors cannot leave their groups or commit, and librdkafka's calls
/// block. The process must still exit — within the drain deadline (15 s) and the exit's grace
/// for blocking calls (5 s) — with a non-zero status and a message naming what did not stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_the_broker_stalls_exits_non_zero_naming_what_hung() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    apply_topics(&broker, &test_settings(None)).await;
    let ops = free_port();
    let mut child = start_process(&broker.bootstrap(), ops);
    wait_ready(&mut child, ops).await;
    let broker_pid = broker.pid().expect("the embedded broker is a process");
    signal(broker_pid, "STOP");
    signal(child.id(), "TERM");
    let (status, stderr) = wait_exit(child, Duration::from_secs(45));
    signal(broker_pid, "CONT");
    assert!(
        !status.success(),
        "exited {status} although it could not drain: {stderr}"
    );
    assert!(
        stderr.contains("did not stop within the drain deadline"),
        "the error names what hung: {stderr}"
    );
}
