//! The retry schedule, jitter and budget.

use std::time::Duration;

use lifeboat_source::SplitMix64;
use serde::{Deserialize, Serialize};

const MINUTE: Duration = Duration::from_secs(60);

/// When to retry a recoverable failure, and for how long to keep trying.
///
/// The [`Default`] is the Hyper-V Replica / Azure Site Recovery schedule: after the first
/// failure retry after **1, 2, 4, 8 and 10 minutes**, then **every 30 minutes** while the
/// error persists, with no jitter and no budget (retry until an operator acts).
///
/// ```
/// use std::time::Duration;
/// use lifeboat_retry::Policy;
///
/// let p = Policy::default();
/// let minutes: Vec<u64> = (0..7).map(|i| p.base_delay(i).as_secs() / 60).collect();
/// assert_eq!(minutes, [1, 2, 4, 8, 10, 30, 30]);
///
/// // The same shape, a sixtieth as long (for a test, or a 30-second copy frequency).
/// let fast = Policy::default().scaled(1, 60);
/// assert_eq!(fast.base_delay(0), Duration::from_secs(1));
/// assert_eq!(fast.base_delay(9), Duration::from_secs(30));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Delays before retries 1, 2, … in order.
    pub steps: Vec<Duration>,
    /// Delay before every retry after the steps run out.
    pub then_every: Duration,
    /// Extra random delay added to each scheduled delay; `None` for none.
    pub jitter: Option<Jitter>,
    /// When to give up on a recoverable failure; the default never gives up.
    pub budget: Budget,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            steps: [1, 2, 4, 8, 10].map(|m| MINUTE * m).to_vec(),
            then_every: MINUTE * 30,
            jitter: None,
            budget: Budget::default(),
        }
    }
}

impl Policy {
    /// The scheduled delay before retry number `retry_index + 1`, without jitter.
    pub fn base_delay(&self, retry_index: u32) -> Duration {
        usize::try_from(retry_index)
            .ok()
            .and_then(|i| self.steps.get(i))
            .copied()
            .unwrap_or(self.then_every)
    }

    /// The longest delay the schedule ever asks for, without jitter.
    pub fn max_base_delay(&self) -> Duration {
        self.steps
            .iter()
            .copied()
            .chain([self.then_every])
            .max()
            .unwrap_or(self.then_every)
    }

    /// The longest delay a retry can be given (schedule plus the jitter bound), not counting
    /// a server's longer `Retry-After`.
    pub fn max_delay(&self) -> Duration {
        let base = self.max_base_delay();
        base.saturating_add(self.jitter.map_or(Duration::ZERO, |j| j.bound(base)))
    }

    /// Every delay (steps, steady interval, jitter cap, budget time) multiplied by
    /// `num / den`. `den == 0` is treated as 1.
    pub fn scaled(mut self, num: u32, den: u32) -> Self {
        let den = den.max(1);
        let scale = |d: Duration| d.saturating_mul(num) / den;
        for s in &mut self.steps {
            *s = scale(*s);
        }
        self.then_every = scale(self.then_every);
        if let Some(j) = &mut self.jitter {
            j.max = scale(j.max);
        }
        if let Some(e) = &mut self.budget.max_elapsed {
            *e = scale(*e);
        }
        self
    }

    /// Sets the jitter.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = Some(jitter);
        self
    }

    /// Sets the budget.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }
}

/// Bounded random extra delay, so that many items failing together do not retry together.
///
/// Each delay `d` gets an extra delay drawn uniformly from `0..=min(d × permille / 1000, max)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jitter {
    /// The extra delay's bound as a fraction of the delay, in thousandths (`100` = 10 %).
    /// Values above 1000 are treated as 1000.
    pub permille: u32,
    /// An absolute bound on the extra delay.
    pub max: Duration,
}

impl Jitter {
    /// The largest extra delay this jitter can add to `delay`.
    pub fn bound(&self, delay: Duration) -> Duration {
        (delay.saturating_mul(self.permille.min(1000)) / 1000).min(self.max)
    }
}

/// When to stop retrying a recoverable failure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// At most this many retries after the first failure; `None` for no limit.
    pub max_retries: Option<u32>,
    /// Give up rather than schedule a retry later than this long after the first failure;
    /// `None` for no limit.
    pub max_elapsed: Option<Duration>,
}

/// A source of random numbers for [`Jitter`]; inject your own for tests or determinism.
pub trait JitterSource {
    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64;
}

/// The default [`JitterSource`]: the workspace's one seeded generator. Seed it differently
/// per item (for example from the item's id) so items do not move in step.
impl JitterSource for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        SplitMix64::next_u64(self)
    }
}
