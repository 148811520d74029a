//! Profiling mode: where a training step's or an inference run's time goes.
//!
//! `MAGICTAILOR_PROFILE=1` (read once) or [`enable`] turns it on. Code marks a region
//! with `let _p = profile::scope(Kind::X, device);`; the region ends when the guard
//! drops. Off (the default), a scope costs one relaxed atomic load and a branch.
//!
//! On the CPU a region is timed with the wall clock. On CUDA it is timed with two events
//! recorded on the device's stream, so no scope synchronizes; the events are read when
//! a report is built or when many have piled up with no region open (one wait for the
//! stream, then every pair is done).
//!
//! Op kinds ([`Class::Op`]) are exclusive: an op region opened inside another op's
//! region is subtracted from the outer one, so op rows never overlap and can be summed.
//! Parts and phases are inclusive: they contain ops and each other.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Device;

/// How a kind's time relates to the others'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Part,
    Phase,
    Op,
}

/// Declares `Kind` (in table order), `Kind::ALL`, `Kind::class` and `Kind::label` from
/// one table of `Kind => Class "label"` rows.
macro_rules! kinds {
    ($($kind:ident => $class:ident $label:literal,)*) => {
        /// What a region measures.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Kind {
            $($kind,)*
        }

        impl Kind {
            /// Every kind, in declaration order (`ALL[k as usize] == k`).
            pub const ALL: &'static [Kind] = &[$(Kind::$kind,)*];

            pub fn label(self) -> &'static str {
                match self {
                    $(Kind::$kind => $label,)*
                }
            }

            pub fn class(self) -> Class {
                match self {
                    $(Kind::$kind => Class::$class,)*
                }
            }
        }
    };
}

kinds! {
    // Model parts (forward only; their backward is in `Backward`).
    TextEncoder => Part "text encoder",
    UNet => Part "U-Net forward",
    VaeEncode => Part "VAE encode",
    VaeDecode => Part "VAE decode",
    // Training step phases.
    TrainStep => Phase "train step",
    Data => Phase "data, augment, DM-Deg noise",
    ForwardLoss => Phase "forward + loss",
    Backward => Phase "backward",
    HostRead => Phase "host reads",
    GradClip => Phase "gradient clipping",
    Optimizer => Phase "optimizer",
    Momentum => Phase "momentum EMA",
    // Inference.
    DenoiseStep => Phase "denoising step",
    // Ops (src/model/ops), exclusive.
    AttentionFwd => Op "attention fwd",
    AttentionBwd => Op "attention bwd",
    GroupNormFwd => Op "group-norm(+SiLU) fwd",
    GroupNormBwd => Op "group-norm(+SiLU) bwd",
    LayerNormFwd => Op "layer-norm fwd",
    LayerNormBwd => Op "layer-norm bwd",
    GegluFwd => Op "GEGLU fwd",
    GegluBwd => Op "GEGLU bwd",
    LinearFwd => Op "frozen linear fwd",
    LinearBwd => Op "frozen linear bwd",
    ConvFwd => Op "frozen conv fwd",
    ConvBwd => Op "frozen conv bwd",
    UpsampleFwd => Op "upsample 2x fwd",
    UpsampleBwd => Op "upsample 2x bwd",
    LoraFwd => Op "LoRA linear fwd",
    LoraBwd => Op "LoRA linear bwd",
}

const KINDS: usize = Kind::ALL.len();

impl Kind {
    /// Whether this op kind times a backward pass.
    fn is_op_backward(self) -> bool {
        self.class() == Class::Op && self.label().ends_with(" bwd")
    }
}

/// The label of the backward time no op claims: candle's own ops' backward passes.
pub const UNATTRIBUTED_BACKWARD: &str = "backward (candle ops, unattributed)";

// ---------------------------------------------------------------------------------------
// On / off.

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
static SWITCH: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether profiling is on; the first call reads `MAGICTAILOR_PROFILE`.
#[inline]
pub fn enabled() -> bool {
    match SWITCH.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => init_from_env(),
    }
}

#[cold]
fn init_from_env() -> bool {
    let on = std::env::var("MAGICTAILOR_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
    set_enabled(on);
    on
}

/// Turns profiling on (benches, tests), whatever the environment says.
pub fn enable() {
    set_enabled(true);
}

pub fn set_enabled(on: bool) {
    SWITCH.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------
// Regions.

/// A point in time on a device's clock.
enum Mark {
    Cpu(Instant),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

/// Where a region's marks are taken: the host clock, or a CUDA stream.
#[derive(Clone)]
enum Clock {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>),
}

impl Clock {
    fn of(device: &Device) -> Self {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Clock::Cuda(d.cuda_stream()),
            _ => Clock::Cpu,
        }
    }

    /// Now on this clock; `None` if a CUDA event could not be recorded.
    fn mark(&self) -> Option<Mark> {
        match self {
            Clock::Cpu => Some(Mark::Cpu(Instant::now())),
            #[cfg(feature = "cuda")]
            Clock::Cuda(stream) => {
                use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
                // The default flags keep timing on (`None` would turn it off).
                let event = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
                event.ok().map(Mark::Cuda)
            }
        }
    }
}

/// Seconds from `start` to `end`; on CUDA this waits for `end` to be reached.
fn seconds(start: &Mark, end: &Mark) -> f64 {
    match (start, end) {
        (Mark::Cpu(a), Mark::Cpu(b)) => b.duration_since(*a).as_secs_f64(),
        #[cfg(feature = "cuda")]
        (Mark::Cuda(a), Mark::Cuda(b)) => a.elapsed_ms(b).map_or(0.0, |ms| ms as f64 / 1e3),
        #[cfg(feature = "cuda")]
        _ => 0.0,
    }
}

/// One region: closed once `end` is set.
struct Span {
    kind: Kind,
    parent: Option<usize>,
    start: Mark,
    end: Option<Mark>,
}

/// Regions not yet read, and the totals of those already read.
struct State {
    spans: Vec<Span>,
    /// Bumped whenever `spans` is emptied, so a guard opened before does not close
    /// another region that took its index.
    generation: u64,
    open: usize,
    totals: Totals,
}

static STATE: Mutex<State> = Mutex::new(State {
    spans: Vec::new(),
    generation: 0,
    open: 0,
    totals: Totals::ZERO,
});

/// Closed regions are read once this many have piled up and none is open.
const FLUSH_AT: usize = 4096;

thread_local! {
    /// This thread's open op regions as (generation, index into `State::spans`),
    /// innermost last.
    static OPEN_OPS: RefCell<Vec<(u64, usize)>> = const { RefCell::new(Vec::new()) };
}

fn state() -> MutexGuard<'static, State> {
    // A panic while holding the lock leaves plain data; keep using it.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Times a region from now until the guard drops (when profiling is on).
#[inline]
pub fn scope(kind: Kind, device: &Device) -> Guard {
    if !enabled() {
        return Guard(None);
    }
    open(kind, Clock::of(device))
}

/// `f()`, timed as a region of `kind`.
pub fn time<T>(kind: Kind, device: &Device, f: impl FnOnce() -> T) -> T {
    let _guard = scope(kind, device);
    f()
}

/// Ends its region when dropped. Holds nothing when profiling is off.
#[must_use = "the region ends when the guard drops"]
pub struct Guard(Option<Open>);

struct Open {
    index: usize,
    generation: u64,
    is_op: bool,
    clock: Clock,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(open) = self.0.take() {
            let end = open.clock.mark();
            close(&open, end);
        }
    }
}

#[cold]
fn open(kind: Kind, clock: Clock) -> Guard {
    let is_op = kind.class() == Class::Op;
    let enclosing = match is_op {
        true => OPEN_OPS.with(|s| s.borrow().last().copied()),
        false => None,
    };
    let Some(start) = clock.mark() else {
        return Guard(None);
    };
    let (index, generation) = {
        let mut st = state();
        let generation = st.generation;
        let parent = enclosing.filter(|&(g, _)| g == generation).map(|(_, i)| i);
        st.spans.push(Span {
            kind,
            parent,
            start,
            end: None,
        });
        st.open += 1;
        (st.spans.len() - 1, generation)
    };
    if is_op {
        OPEN_OPS.with(|s| s.borrow_mut().push((generation, index)));
    }
    Guard(Some(Open {
        index,
        generation,
        is_op,
        clock,
    }))
}

#[cold]
fn close(open: &Open, end: Option<Mark>) {
    if open.is_op {
        OPEN_OPS.with(|s| s.borrow_mut().pop());
    }
    let mut st = state();
    if st.generation != open.generation {
        return; // read or reset while open: not counted
    }
    let Some(span) = st.spans.get_mut(open.index) else {
        return;
    };
    // A region whose end could not be marked counts as empty.
    span.end = Some(end.unwrap_or_else(|| Mark::Cpu(Instant::now())));
    st.open = st.open.saturating_sub(1);
    if st.open == 0 && st.spans.len() >= FLUSH_AT {
        flush(&mut st);
    }
}

/// Reads every closed region into the totals (on CUDA the first read waits for the
/// stream); regions still open are dropped uncounted.
fn flush(st: &mut State) {
    let spans = std::mem::take(&mut st.spans);
    st.generation += 1;
    st.open = 0;
    let timed: Vec<(Kind, Option<usize>, f64)> = spans
        .iter()
        .filter_map(|s| Some((s.kind, s.parent, seconds(&s.start, s.end.as_ref()?))))
        .collect();
    st.totals.add_spans(&timed);
}

// ---------------------------------------------------------------------------------------
// Aggregation.

/// Calls and seconds per kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Totals {
    calls: [u64; KINDS],
    seconds: [f64; KINDS],
}

impl Totals {
    pub const ZERO: Totals = Totals {
        calls: [0; KINDS],
        seconds: [0.0; KINDS],
    };

    /// Adds regions given as `(kind, parent, seconds)`, `parent` indexing the same slice.
    /// An op's children's time is taken out of its own (exclusive op timings).
    pub fn add_spans(&mut self, spans: &[(Kind, Option<usize>, f64)]) {
        let mut child = vec![0.0; spans.len()];
        for &(_, parent, secs) in spans {
            if let Some(p) = parent.filter(|&p| p < spans.len()) {
                child[p] += secs;
            }
        }
        for (&(kind, _, secs), child) in spans.iter().zip(child) {
            let own = match kind.class() {
                Class::Op => (secs - child).max(0.0),
                _ => secs,
            };
            self.calls[kind as usize] += 1;
            self.seconds[kind as usize] += own;
        }
    }

    pub fn calls(&self, kind: Kind) -> u64 {
        self.calls[kind as usize]
    }

    pub fn seconds(&self, kind: Kind) -> f64 {
        self.seconds[kind as usize]
    }

    /// Backward time no op claims: the backward phase minus every op's backward.
    fn unattributed_backward(&self) -> f64 {
        let ops: f64 = (Kind::ALL.iter())
            .filter(|k| k.is_op_backward())
            .map(|&k| self.seconds(k))
            .sum();
        (self.seconds(Kind::Backward) - ops).max(0.0)
    }
}

/// Forgets every region so far (open ones included: they will not be counted).
pub fn reset() {
    let mut st = state();
    st.spans.clear();
    st.generation += 1;
    st.open = 0;
    st.totals = Totals::ZERO;
}

/// The totals so far; reads every closed region (on CUDA: waits for the stream).
pub fn totals() -> Totals {
    let mut st = state();
    flush(&mut st);
    st.totals.clone()
}

// ---------------------------------------------------------------------------------------
// Report.

/// One row of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub name: &'static str,
    pub class: Class,
    pub calls: u64,
    pub seconds: f64,
}

/// Per-kind totals against a wall time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub wall_seconds: f64,
    /// Parts, then phases, then ops; each by time, largest first. Kinds never entered
    /// are left out.
    pub rows: Vec<Row>,
}

impl Report {
    pub fn new(totals: &Totals, wall: Duration) -> Self {
        let mut rows: Vec<Row> = (Kind::ALL.iter())
            .filter(|&&k| totals.calls(k) > 0)
            .map(|&k| Row {
                name: k.label(),
                class: k.class(),
                calls: totals.calls(k),
                seconds: totals.seconds(k),
            })
            .collect();
        if totals.calls(Kind::Backward) > 0 {
            rows.push(Row {
                name: UNATTRIBUTED_BACKWARD,
                class: Class::Op,
                calls: totals.calls(Kind::Backward),
                seconds: totals.unattributed_backward(),
            });
        }
        rows.sort_by(|a, b| a.class.cmp(&b.class).then(b.seconds.total_cmp(&a.seconds)));
        Self {
            wall_seconds: wall.as_secs_f64(),
            rows,
        }
    }

    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// The table printed to stderr.
    pub fn table(&self) -> String {
        let mut out = format!(
            "profile (wall {:.3} s; parts and phases inclusive, ops exclusive)\n\
             {:<38} {:>5} {:>8} {:>10} {:>10} {:>7}\n",
            self.wall_seconds, "kind", "class", "calls", "total s", "ms/call", "share"
        );
        for r in &self.rows {
            let class = match r.class {
                Class::Part => "part",
                Class::Phase => "phase",
                Class::Op => "op",
            };
            out += &format!(
                "{:<38} {:>5} {:>8} {:>10.3} {:>10.3} {:>6.1}%\n",
                r.name,
                class,
                r.calls,
                r.seconds,
                1e3 * r.seconds / r.calls.max(1) as f64,
                100.0 * r.seconds / self.wall_seconds.max(f64::MIN_POSITIVE)
            );
        }
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// A profiled command: [`Run::start`] forgets earlier regions and starts the wall clock.
pub struct Run {
    started: Instant,
}

impl Run {
    /// `None` when profiling is off.
    pub fn start() -> Option<Self> {
        if !enabled() {
            return None;
        }
        reset();
        Some(Self {
            started: Instant::now(),
        })
    }

    /// Everything recorded since the start. On CUDA the stream is waited for before the
    /// wall clock stops, so the wall time covers the regions' GPU work.
    pub fn finish(self) -> Report {
        let totals = totals();
        Report::new(&totals, self.started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_listed_in_declaration_order() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
        assert_eq!(Kind::UNet.class(), Class::Part);
        assert_eq!(Kind::Backward.class(), Class::Phase);
        assert_eq!(Kind::AttentionFwd.class(), Class::Op);
        assert!(Kind::AttentionBwd.is_op_backward() && !Kind::AttentionFwd.is_op_backward());
    }

    #[test]
    fn nested_ops_are_exclusive_and_parts_inclusive() {
        let mut t = Totals::ZERO;
        // A U-Net forward (part) holding a LoRA op that holds a frozen linear op.
        t.add_spans(&[
            (Kind::UNet, None, 1.0),
            (Kind::LoraFwd, None, 0.5),
            (Kind::LinearFwd, Some(1), 0.3),
            (Kind::LinearFwd, Some(1), 0.1),
        ]);
        assert_eq!(t.calls(Kind::LinearFwd), 2);
        assert!((t.seconds(Kind::LinearFwd) - 0.4).abs() < 1e-12);
        assert!((t.seconds(Kind::LoraFwd) - 0.1).abs() < 1e-12);
        assert_eq!(t.seconds(Kind::UNet), 1.0);
        // A second batch adds up.
        t.add_spans(&[(Kind::UNet, None, 2.0)]);
        assert_eq!((t.calls(Kind::UNet), t.seconds(Kind::UNet)), (2, 3.0));
    }

    #[test]
    fn unattributed_backward_is_the_rest_of_the_backward_phase() {
        let mut t = Totals::ZERO;
        t.add_spans(&[
            (Kind::Backward, None, 2.0),
            (Kind::AttentionBwd, None, 0.5),
            (Kind::ConvBwd, None, 0.25),
            (Kind::ConvFwd, None, 9.0),
        ]);
        let r = Report::new(&t, Duration::from_secs(4));
        let rest = r.row(UNATTRIBUTED_BACKWARD).expect("row");
        assert!((rest.seconds - 1.25).abs() < 1e-12, "{}", rest.seconds);
        assert_eq!(rest.calls, 1);
        // Parts and phases first, then ops by time.
        assert_eq!(r.rows[0].name, "backward");
        assert_eq!(r.rows[1].name, "frozen conv fwd");
        assert!(
            r.row("U-Net forward").is_none(),
            "kinds never entered are left out"
        );
        let table = r.table();
        assert!(
            table.contains("attention bwd") && table.contains("12.5%"),
            "{table}"
        );
        assert_eq!(r.to_json()["rows"][0]["class"], "phase");
    }
}
