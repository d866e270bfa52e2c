//! Test tokens decide outright: `tok_visa` is authorized and `tok_decline` declined whatever the
//! random decline rate says; other tokens follow the rate.

use std::time::Duration;

use orderflow_gateway::{simulator::Simulator, Answer, ChargeRequest, GatewayClient};
use orderflow_platform::Settings;
use tokio_util::sync::CancellationToken;

fn charge(key: &str, token: &str) -> ChargeRequest {
    ChargeRequest {
        idempotency_key: key.to_owned(),
        amount_minor: 999,
        currency: "EUR".to_owned(),
        payment_token: token.to_owned(),
    }
}

#[tokio::test]
async fn test_tokens_decide_whatever_the_decline_rate() {
    let mut settings = Settings::from_defaults(&Default::default())
        .expect("defaults")
        .gateway;
    settings.listen = "127.0.0.1:0".parse().expect("addr");
    settings.latency_ms = 0;
    // Every charge a token does not decide is declined.
    settings.decline_rate = 1.0;
    let simulator = Simulator::bind(&settings).await.expect("bind");
    let client = GatewayClient::new(&simulator.base_url().expect("url"), &Default::default())
        .expect("client");
    let stop = CancellationToken::new();
    tokio::spawn(simulator.run(stop.clone()));
    let timeout = Duration::from_secs(10);

    for n in 0..20 {
        let answer = client
            .charge(&charge(&format!("visa-{n}"), "tok_visa"), timeout)
            .await
            .expect("answer");
        assert!(matches!(answer, Answer::Authorized { .. }), "{answer:?}");
    }
    let answer = client
        .charge(&charge("decline-1", "tok_decline"), timeout)
        .await
        .expect("answer");
    assert!(matches!(answer, Answer::Declined { .. }), "{answer:?}");
    let answer = client
        .charge(&charge("other-1", "tok_other"), timeout)
        .await
        .expect("answer");
    assert!(
        matches!(answer, Answer::Declined { .. }),
        "the rate decides other tokens: {answer:?}"
    );
    stop.cancel();
}
