//! Integration tests: real sockets on 127.0.0.1:0, tollgate in-process, a
//! scripted mock upstream.

mod metrics_text;
mod support;

mod api;
mod budget;
mod coalescing;
mod drain;
mod egress;
mod errors;
mod faults;
mod ledger;
mod ledger_postgres;
mod lifecycle;
mod passthrough;
mod reload;
mod scaleout;
mod sdk;
mod services;
mod state_redis;
mod streaming;
mod tls;
