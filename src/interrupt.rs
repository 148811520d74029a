//! Ctrl-C and SIGTERM during a long job: the first asks it to stop at the next safe
//! point (a training step's end, after a checkpoint); the second exits at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::console;

pub const SIGINT: i32 = signal_hook::consts::SIGINT;
pub const SIGTERM: i32 = signal_hook::consts::SIGTERM;

/// Whether a stop was asked for, and by which signal.
#[derive(Clone, Default)]
pub struct Interrupt {
    signal: Arc<AtomicUsize>,
}

impl Interrupt {
    /// Never fires (library use, tests).
    pub fn none() -> Self {
        Self::default()
    }

    /// Handles SIGINT and SIGTERM for this process. Unless `quiet`, says on stderr what
    /// happens when the first one arrives.
    pub fn install(quiet: bool) -> Result<Self> {
        let me = Self::default();
        let armed = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            let register = || -> std::io::Result<()> {
                // Order matters: the exit checks `armed` before this signal sets it.
                signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())?;
                signal_hook::flag::register(sig, armed.clone())?;
                signal_hook::flag::register_usize(sig, me.signal.clone(), sig as usize)?;
                Ok(())
            };
            register().map_err(|e| Error::internal(format!("installing a signal handler: {e}")))?;
        }
        if !quiet {
            me.announce_when_requested();
        }
        Ok(me)
    }

    /// The signal that asked to stop, if any.
    pub fn requested(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }

    /// A handler may not print, so a watcher thread does.
    fn announce_when_requested(&self) {
        let me = self.clone();
        std::thread::spawn(move || loop {
            if let Some(sig) = me.requested() {
                console::note(format_args!(
                    "\n{}: stopping after the current step and saving a checkpoint; press Ctrl-C \
                     again to quit at once.",
                    name(sig)
                ));
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        });
    }
}

pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "signal",
    }
}
