//! Where a method's time goes, phase by phase, for diagnosis. On a GPU the host queues work
//! and moves on, so a host clock charges queued work to whichever later phase waits for it.
//! With `RuntimeFlags::sync_phases` (`SAMKV_SYNC_PHASES=1`) every lap first waits for the device, and each assembly logs
//! its laps (summed by name) at info level; this costs the overlap between phases, so
//! time-to-first-token numbers are taken without it.

use std::time::Instant;

use candle_core::Device;

use crate::model::Model;

/// Laps of one assembly, summed by name (a no-op unless the model's `sync_phases` is set).
pub struct PhaseClock {
    dev: Option<Device>,
    last: Instant,
    laps: Vec<(&'static str, f64)>,
}

impl PhaseClock {
    pub fn new(model: &Model) -> Self {
        let dev = model.flags().sync_phases.then(|| model.device().clone());
        if let Some(d) = &dev {
            let _ = d.synchronize();
        }
        Self {
            dev,
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Charges the time since the last lap (device work included) to `name`.
    pub fn lap(&mut self, name: &'static str) {
        let Some(d) = &self.dev else { return };
        let _ = d.synchronize();
        let ms = self.last.elapsed().as_secs_f64() * 1e3;
        self.last = Instant::now();
        match self.laps.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += ms,
            None => self.laps.push((name, ms)),
        }
    }

    /// Logs the laps under `what`.
    pub fn report(&self, what: &str) {
        if self.dev.is_none() {
            return;
        }
        let laps: Vec<String> = self
            .laps
            .iter()
            .map(|(n, t)| format!("{n} {t:.2}"))
            .collect();
        tracing::info!(
            "{what} phases (ms, device synchronized): {}",
            laps.join(", ")
        );
    }
}
