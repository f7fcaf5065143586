//! Spend counters of window caps, one per cap, holding only the current
//! calendar period (an older period is dropped the moment a newer one is
//! seen, so memory is one slot per configured cap).

use std::sync::{Mutex, PoisonError};

use super::clock::period_id;
use super::config::WindowPeriod;
use crate::money::Money;

#[derive(Debug)]
pub(crate) struct WindowSlot {
    /// `WindowPolicy::name`: the identity that carries spend across reloads.
    pub(crate) name: String,
    pub(crate) period: WindowPeriod,
    state: Mutex<PeriodSpend>,
}

#[derive(Debug, Default)]
struct PeriodSpend {
    period: u64,
    spent: Money,
}

impl PeriodSpend {
    /// Moves to the period of `now_ms` if it is newer; a clock stepping back
    /// keeps counting into the newest period seen.
    fn roll(&mut self, period: WindowPeriod, now_ms: u64) {
        let id = period_id(period, now_ms);
        if id > self.period {
            self.period = id;
            self.spent = Money::ZERO;
        }
    }
}

impl WindowSlot {
    pub(crate) fn new(name: String, period: WindowPeriod) -> WindowSlot {
        WindowSlot {
            name,
            period,
            state: Mutex::new(PeriodSpend::default()),
        }
    }

    /// Spend of the period containing `now_ms`.
    pub(crate) fn spent(&self, now_ms: u64) -> Money {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.roll(self.period, now_ms);
        s.spent
    }

    pub(crate) fn add(&self, now_ms: u64, cost: Money) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.roll(self.period, now_ms);
        s.spent = s.spent.saturating_add(cost);
    }
}
