//! The owner's policy: when guests may start, are throttled, suspended,
//! continued and evicted, each a CEL expression over the machine's current
//! figures ([`Vars`]).
//!
//! ```toml
//! [policy]
//! start     = "owner_idle_s >= 300 && owner_cpu < 0.25"
//! throttle  = "owner_cpu > 0.25"
//! suspend   = "owner_idle_s < 5 || owner_cpu > 0.5"
//! continue  = "owner_idle_s >= 300 && owner_cpu < 0.25"
//! evict     = "suspended_s >= 600"
//! throttle_cpus = 0.5
//! evict_grace_s = 10
//! ```
//!
//! Every expression is compiled and checked when the config is loaded: a
//! syntax error, an unknown variable or a result that is not a boolean is
//! refused with the key and its line and column in the file.

use std::fmt;
use std::sync::Arc;

use cel::{Context, Program, Value};
use serde::Deserialize;
use toml::Spanned;

/// The variables an expression can use, and what each means.
pub const VARIABLES: &[(&str, &str)] = &[
    (
        "owner_idle_s",
        "(integer) seconds since the owner's last keyboard, mouse or terminal input",
    ),
    (
        "owner_cpu",
        "the owner's CPU use, everything outside the guests, 0 to 1 of the machine",
    ),
    ("load1", "1-minute load average"),
    ("mem_avail_bytes", "memory available, bytes"),
    ("mem_total_bytes", "memory installed, bytes"),
    ("hour", "local hour of the day, 0 to 23"),
    ("weekday", "local day of the week, 0 (Sunday) to 6"),
    ("guests", "guest tasks on this machine now"),
    (
        "suspended_s",
        "(per task) seconds the task has been suspended, 0 when running",
    ),
    ("running_s", "(per task) seconds since the task was claimed"),
];

/// The variables that exist per task, only in `evict`.
const PER_TASK: [&str; 2] = ["suspended_s", "running_s"];

/// Defaults, right out of the box: guests start after five idle minutes
/// with the owner's CPU quiet, are throttled when the owner's CPU is busy,
/// freeze at once on owner input, continue after five idle minutes and are
/// evicted after ten minutes frozen.
pub const DEFAULT_START: &str = "owner_idle_s >= 300 && owner_cpu < 0.25";
/// See [`DEFAULT_START`].
pub const DEFAULT_THROTTLE: &str = "owner_cpu > 0.25";
/// See [`DEFAULT_START`].
pub const DEFAULT_SUSPEND: &str = "owner_idle_s < 5 || owner_cpu > 0.5";
/// See [`DEFAULT_START`].
pub const DEFAULT_CONTINUE: &str = "owner_idle_s >= 300 && owner_cpu < 0.25";
/// See [`DEFAULT_START`].
pub const DEFAULT_EVICT: &str = "suspended_s >= 600";
/// CPUs a throttled guest may use.
pub const DEFAULT_THROTTLE_CPUS: f64 = 0.5;
/// Seconds between SIGTERM and SIGKILL on eviction.
pub const DEFAULT_EVICT_GRACE_S: u64 = 10;

/// The `[policy]` table as written (every key optional).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// May a new guest start.
    pub start: Option<Spanned<String>>,
    /// Cap running guests at `throttle_cpus`.
    pub throttle: Option<Spanned<String>>,
    /// Freeze running guests.
    pub suspend: Option<Spanned<String>>,
    /// Thaw suspended guests.
    #[serde(rename = "continue")]
    pub continue_: Option<Spanned<String>>,
    /// Evict a guest (per task: `suspended_s`, `running_s`).
    pub evict: Option<Spanned<String>>,
    /// CPUs a throttled guest may use.
    pub throttle_cpus: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL on eviction.
    pub evict_grace_s: Option<u64>,
}

/// Why a policy was refused. The policy in force (if any) stays.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// An expression that does not compile, uses an unknown variable, or
    /// does not give a boolean.
    #[error("policy.{key}, line {line}, column {column}: {message}")]
    Expr {
        /// The key (`start`, `suspend`, …).
        key: &'static str,
        /// 1-based line in the config file (1 for defaults).
        line: usize,
        /// 1-based column in the config file.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A number out of range.
    #[error("policy.{key}: {message}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// One compiled expression and its source.
#[derive(Clone)]
struct Expr {
    source: String,
    program: Arc<Program>,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

/// The machine's figures an expression is evaluated over.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Vars {
    /// Seconds since owner input (a large number when no input device is
    /// known).
    pub owner_idle_s: f64,
    /// Owner CPU use, 0–1.
    pub owner_cpu: f64,
    /// 1-minute load.
    pub load1: f64,
    /// Available memory, bytes.
    pub mem_avail_bytes: f64,
    /// Installed memory, bytes.
    pub mem_total_bytes: f64,
    /// Local hour 0–23.
    pub hour: f64,
    /// Local weekday 0 (Sunday) – 6.
    pub weekday: f64,
    /// Guest tasks now.
    pub guests: f64,
}

/// Per-task figures, for `evict`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TaskVars {
    /// Seconds suspended (0 when running).
    pub suspended_s: f64,
    /// Seconds since claimed.
    pub running_s: f64,
}

/// The node-wide verdicts of one evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// New guests may start.
    pub start: bool,
    /// Running guests are capped.
    pub throttle: bool,
    /// Running guests freeze.
    pub suspend: bool,
    /// Suspended guests thaw.
    pub cont: bool,
}

/// A compiled, checked policy.
#[derive(Debug, Clone)]
pub struct Policy {
    start: Expr,
    throttle: Expr,
    suspend: Expr,
    cont: Expr,
    evict: Expr,
    /// CPUs a throttled guest may use.
    pub throttle_cpus: f64,
    /// Seconds between SIGTERM and SIGKILL.
    pub evict_grace_s: u64,
}

impl PartialEq for Policy {
    fn eq(&self, o: &Self) -> bool {
        self.sources() == o.sources()
            && self.throttle_cpus == o.throttle_cpus
            && self.evict_grace_s == o.evict_grace_s
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::compile(&PolicyConfig::default(), "").unwrap_or_else(|e| {
            // The defaults are tested to compile; this is unreachable.
            panic!("default policy: {e}")
        })
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn compile_one(
    key: &'static str,
    written: Option<&Spanned<String>>,
    default: &str,
    text: &str,
    per_task: bool,
) -> Result<Expr, PolicyError> {
    let (source, line, column) = match written {
        Some(s) => {
            // The span covers the quoted string: the expression starts one
            // character in (for "…" and '…'; multi-line strings are rare).
            let (l, c) = line_col(text, s.span().start);
            (s.get_ref().clone(), l, c + 1)
        }
        None => (default.to_owned(), 1, 1),
    };
    let err = |l: usize, c: usize, message: String| PolicyError::Expr {
        key,
        line: line + l.saturating_sub(1),
        column: if l <= 1 {
            column + c.saturating_sub(1)
        } else {
            c
        },
        message,
    };
    let program = Program::compile(&source).map_err(|e| match e.errors.first() {
        Some(p) => err(p.pos.0 as usize, p.pos.1 as usize, p.msg.clone()),
        None => err(1, 1, e.to_string()),
    })?;
    let usable = |n: &str| per_task || !PER_TASK.contains(&n);
    for v in program.references().variables() {
        if !VARIABLES.iter().any(|(n, _)| *n == v && usable(n)) {
            let names: Vec<&str> = VARIABLES
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| usable(n))
                .collect();
            return Err(err(
                1,
                source.find(v).map_or(1, |i| i + 1),
                format!("unknown variable {v:?} (known: {})", names.join(", ")),
            ));
        }
    }
    let e = Expr {
        source,
        program: Arc::new(program),
    };
    // A trial run over typical figures catches results that are not
    // booleans (`owner_idle_s + 1`) and type errors (`hour && true`).
    let trial = Vars {
        owner_idle_s: 400.0,
        owner_cpu: 0.1,
        load1: 0.5,
        mem_avail_bytes: 8e9,
        mem_total_bytes: 16e9,
        hour: 12.0,
        weekday: 3.0,
        guests: 1.0,
    };
    eval(&e, &trial, &TaskVars::default()).map_err(|m| err(1, 1, m))?;
    Ok(e)
}

fn eval(e: &Expr, v: &Vars, t: &TaskVars) -> Result<bool, String> {
    let mut c = Context::default();
    // Whole quantities are integers and fractions floats, so that the
    // natural spellings (`owner_idle_s / 60 >= 5`, `owner_cpu < 0.25`)
    // type-check: CEL does not mix the two in arithmetic.
    let int = |x: f64| Value::Int(x.clamp(-9e18, 9e18) as i64);
    let vars = [
        ("owner_idle_s", int(v.owner_idle_s)),
        ("owner_cpu", Value::Float(v.owner_cpu)),
        ("load1", Value::Float(v.load1)),
        ("mem_avail_bytes", int(v.mem_avail_bytes)),
        ("mem_total_bytes", int(v.mem_total_bytes)),
        ("hour", int(v.hour)),
        ("weekday", int(v.weekday)),
        ("guests", int(v.guests)),
        ("suspended_s", int(t.suspended_s)),
        ("running_s", int(t.running_s)),
    ];
    for (n, x) in vars {
        c.add_variable_from_value(n, x);
    }
    match e.program.execute(&c) {
        Ok(Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!(
            "must give true or false, gave {other:?} for typical figures"
        )),
        Err(x) => Err(format!("cannot be evaluated: {x}")),
    }
}

impl Policy {
    /// Compiles and checks a `[policy]` table; `text` is the whole config
    /// file, for line numbers.
    ///
    /// # Errors
    /// The first bad expression or value, with its key and position.
    pub fn compile(c: &PolicyConfig, text: &str) -> Result<Self, PolicyError> {
        let throttle_cpus = c.throttle_cpus.unwrap_or(DEFAULT_THROTTLE_CPUS);
        if !(throttle_cpus.is_finite() && (0.01..=4096.0).contains(&throttle_cpus)) {
            return Err(PolicyError::Value {
                key: "throttle_cpus",
                message: format!("{throttle_cpus} is outside 0.01 to 4096"),
            });
        }
        let evict_grace_s = c.evict_grace_s.unwrap_or(DEFAULT_EVICT_GRACE_S);
        if evict_grace_s > 3600 {
            return Err(PolicyError::Value {
                key: "evict_grace_s",
                message: format!("{evict_grace_s} is more than an hour"),
            });
        }
        Ok(Self {
            start: compile_one("start", c.start.as_ref(), DEFAULT_START, text, false)?,
            throttle: compile_one(
                "throttle",
                c.throttle.as_ref(),
                DEFAULT_THROTTLE,
                text,
                false,
            )?,
            suspend: compile_one("suspend", c.suspend.as_ref(), DEFAULT_SUSPEND, text, false)?,
            cont: compile_one(
                "continue",
                c.continue_.as_ref(),
                DEFAULT_CONTINUE,
                text,
                false,
            )?,
            evict: compile_one("evict", c.evict.as_ref(), DEFAULT_EVICT, text, true)?,
            throttle_cpus,
            evict_grace_s,
        })
    }

    /// The node-wide verdicts. An expression that fails at run time (it
    /// passed the trial at load) counts as false, the safe side for
    /// `start`, and is logged by the caller through [`Policy::check`].
    pub fn verdict(&self, v: &Vars) -> Verdict {
        let t = TaskVars::default();
        Verdict {
            start: eval(&self.start, v, &t).unwrap_or(false),
            throttle: eval(&self.throttle, v, &t).unwrap_or(false),
            suspend: eval(&self.suspend, v, &t).unwrap_or(false),
            cont: eval(&self.cont, v, &t).unwrap_or(false),
        }
    }

    /// Whether one task is to be evicted.
    pub fn evict(&self, v: &Vars, t: &TaskVars) -> bool {
        eval(&self.evict, v, t).unwrap_or(false)
    }

    /// The expressions in force, by key (for `shoal owner`).
    pub fn sources(&self) -> [(&'static str, &str); 5] {
        [
            ("start", &self.start.source),
            ("throttle", &self.throttle.source),
            ("suspend", &self.suspend.source),
            ("continue", &self.cont.source),
            ("evict", &self.evict.source),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        policy: PolicyConfig,
    }

    fn load(text: &str) -> Result<Policy, PolicyError> {
        let f: File = toml::from_str(text).map_err(|e| PolicyError::Value {
            key: "toml",
            message: e.to_string(),
        })?;
        Policy::compile(&f.policy, text)
    }

    fn idle(owner_idle_s: f64, owner_cpu: f64) -> Vars {
        Vars {
            owner_idle_s,
            owner_cpu,
            mem_total_bytes: 8e9,
            mem_avail_bytes: 4e9,
            ..Vars::default()
        }
    }

    #[test]
    fn defaults_start_when_idle_and_freeze_on_input() {
        let p = Policy::default();
        let away = p.verdict(&idle(600.0, 0.05));
        assert!(away.start && !away.suspend && away.cont && !away.throttle);
        let typing = p.verdict(&idle(0.5, 0.05));
        assert!(!typing.start && typing.suspend && !typing.cont);
        let compiling = p.verdict(&idle(600.0, 0.9));
        assert!(!compiling.start && compiling.suspend && compiling.throttle);
        // Just back, not typing for a minute: neither suspend nor continue.
        let back = p.verdict(&idle(60.0, 0.05));
        assert!(!back.start && !back.suspend && !back.cont);
        let t = |s| TaskVars {
            suspended_s: s,
            running_s: 700.0,
        };
        assert!(!p.evict(&idle(0.0, 0.0), &t(599.0)));
        assert!(p.evict(&idle(0.0, 0.0), &t(600.0)));
    }

    #[test]
    fn written_expressions_replace_defaults() {
        let p = load(
            "[policy]\nstart = \"hour >= 18 || hour < 8\"\nevict = \"running_s > 5\"\nevict_grace_s = 2\n",
        )
        .unwrap();
        let mut v = idle(0.0, 0.0);
        v.hour = 20.0;
        assert!(p.verdict(&v).start);
        v.hour = 12.0;
        assert!(!p.verdict(&v).start);
        assert_eq!(p.evict_grace_s, 2);
        assert_eq!(p.sources()[0].1, "hour >= 18 || hour < 8");
        let p =
            load("[policy]\nstart = \"owner_idle_s / 60 >= 5 && mem_avail_bytes > 1024 * 1024\"\n")
                .unwrap();
        assert!(p.verdict(&idle(300.0, 0.0)).start);
        assert!(!p.verdict(&idle(299.0, 0.0)).start);
    }

    #[test]
    fn a_syntax_error_names_key_line_and_column() {
        let e = load("# mine\n[policy]\nsuspend = \"owner_idle_s < 5 ||| x\"\n").unwrap_err();
        let PolicyError::Expr {
            key, line, column, ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!((*key, *line), ("suspend", 3));
        // `|||` starts at column 30 of the line: 'suspend = "' is 11
        // characters, then 18 characters of expression.
        assert!((28..=32).contains(column), "{e}");
        assert!(e.to_string().starts_with("policy.suspend, line 3"), "{e}");
    }

    #[test]
    fn unknown_variables_and_non_booleans_are_refused() {
        let e = load("[policy]\nstart = \"owner_idel_s > 300\"\n").unwrap_err();
        assert!(
            e.to_string().contains("unknown variable \"owner_idel_s\""),
            "{e}"
        );
        assert!(e.to_string().contains("owner_idle_s"), "{e}");
        let e = load("[policy]\nstart = \"owner_idle_s + 1\"\n").unwrap_err();
        assert!(e.to_string().contains("true or false"), "{e}");
        // Per-task figures only make sense for evict.
        let e = load("[policy]\nstart = \"suspended_s > 1\"\n").unwrap_err();
        assert!(e.to_string().contains("policy.start"), "{e}");
        let e = load("[policy]\nthrottle_cpus = 0.0\n").unwrap_err();
        assert!(e.to_string().contains("throttle_cpus"), "{e}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_toml() {
        assert!(load("[policy]\nstrat = \"true\"\n").is_err());
        assert!(load("[policy]\nevict_grace_s = \"ten\"\n").is_err());
    }
}
