//! The job file.
//!
//! ```toml
//! # One job: the top-level keys. Several: one [[job]] table each.
//! name = "render"
//! command = ["./render", "--frame"]   # each task sees $SHOAL_TASK_INDEX
//! count = 100
//! cpus = 1.0
//! mem = "512M"
//! pids = 256
//! retries = 2
//! image = "/srv/images/debian.tar"
//! inputs = ["scenes/", "render"]
//! output = "out/render"
//! after = ["build"]
//! ```

use serde::Deserialize;

/// Why a job file or a submission was refused. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Bad TOML, an unknown key or a wrong type.
    #[error("line {line}, column {column}: {message}")]
    Parse {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value that parses but cannot be run.
    #[error("job {job:?}: {key}: {message}")]
    Invalid {
        /// The job's name.
        job: String,
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Most tasks one job may have.
pub const MAX_TASKS: u32 = 1_000_000;

/// One job as written.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: Option<String>,
    command: Vec<String>,
    count: Option<u32>,
    cpus: Option<f64>,
    mem: Option<String>,
    pids: Option<u32>,
    retries: Option<u32>,
    image: Option<String>,
    #[serde(default)]
    inputs: Vec<String>,
    output: Option<String>,
    #[serde(default)]
    after: Vec<String>,
}

/// A file of `[[job]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Many {
    job: Vec<toml::Spanned<JobFile>>,
}

/// One checked job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobSpec {
    /// Its name (unique among the submitter's jobs that are not finished).
    pub name: String,
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// How many tasks (`$SHOAL_TASK_INDEX` from 0 to count − 1).
    pub count: u32,
    /// CPUs per task.
    pub cpus: Option<f64>,
    /// Memory per task, bytes.
    pub memory_bytes: Option<u64>,
    /// Processes per task.
    pub pids: Option<u32>,
    /// Attempts after the first failure of a task (its own failures, not
    /// lost nodes or evictions).
    pub retries: u32,
    /// Software environment (a rootfs directory or tarball).
    pub image: Option<String>,
    /// Files and directories shipped to every task (relative to where the
    /// job was submitted).
    pub inputs: Vec<String>,
    /// Where each task's results land (relative to where the job was
    /// submitted): `OUTPUT/INDEX/`.
    pub output: String,
    /// Jobs that must succeed first, by name.
    pub after: Vec<String>,
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Parses a size: `512M`, `2G`, `1.5GiB`, `4096` (bytes).
///
/// # Errors
/// Not a size, naming it.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 2G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} is not a size (e.g. 512M, 2G)")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

fn check(f: JobFile, default_name: &str) -> Result<JobSpec, SpecError> {
    let name = f.name.unwrap_or_else(|| default_name.to_owned());
    let bad = |key, message: String| SpecError::Invalid {
        job: name.clone(),
        key,
        message,
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad(
            "name",
            "1 to 64 letters, digits, '-', '_' or '.'".into(),
        ));
    }
    if f.command.first().is_none_or(String::is_empty) {
        return Err(bad("command", "must name a program".into()));
    }
    let count = f.count.unwrap_or(1);
    if !(1..=MAX_TASKS).contains(&count) {
        return Err(bad("count", format!("{count} is outside 1..={MAX_TASKS}")));
    }
    if let Some(c) = f.cpus {
        if !(c.is_finite() && (0.01..=4096.0).contains(&c)) {
            return Err(bad("cpus", format!("{c} is outside 0.01 to 4096")));
        }
    }
    let memory_bytes = match &f.mem {
        Some(m) => {
            let b = parse_size(m).map_err(|e| bad("mem", e))?;
            if b < 1 << 20 {
                return Err(bad("mem", format!("{m:?} is less than 1 MiB")));
            }
            Some(b)
        }
        None => None,
    };
    if f.pids == Some(0) {
        return Err(bad("pids", "0 (at least 1)".into()));
    }
    let retries = f.retries.unwrap_or(2);
    if retries > 100 {
        return Err(bad("retries", format!("{retries} is more than 100")));
    }
    let safe = |p: &str| {
        !p.is_empty() && !std::path::Path::new(p).is_absolute() && !p.split('/').any(|c| c == "..")
    };
    for i in &f.inputs {
        if !safe(i) {
            return Err(bad(
                "inputs",
                format!("{i:?} must be a path inside the submit directory"),
            ));
        }
    }
    let output = f.output.unwrap_or_else(|| format!("shoal-out/{name}"));
    if !safe(&output) {
        return Err(bad(
            "output",
            format!("{output:?} must be a path inside the submit directory"),
        ));
    }
    if f.after.iter().any(|a| a == &name) {
        return Err(bad("after", "a job cannot wait for itself".into()));
    }
    Ok(JobSpec {
        name,
        argv: f.command,
        count,
        cpus: f.cpus,
        memory_bytes,
        pids: f.pids,
        retries,
        image: f.image,
        inputs: f.inputs,
        output,
        after: f.after,
    })
}

/// Parses and checks a job file; `default_name` names a job that has no
/// `name` (the file's stem).
///
/// # Errors
/// The first problem, with line and column for parse errors and the job
/// and key for values that cannot run; duplicate names in one file.
pub fn parse(text: &str, default_name: &str) -> Result<Vec<JobSpec>, SpecError> {
    let parse_err = |e: toml::de::Error| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        SpecError::Parse {
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    };
    // One job at the top level, or `[[job]]` tables: decided on the
    // table's keys, then parsed again as that shape so errors keep their
    // positions.
    let table: toml::Table = toml::from_str(text).map_err(parse_err)?;
    let jobs = match table.contains_key("job") {
        false => vec![check(
            toml::from_str(text).map_err(parse_err)?,
            default_name,
        )?],
        true => {
            let Many { job } = toml::from_str(text).map_err(parse_err)?;
            let mut out: Vec<JobSpec> = Vec::new();
            for (i, j) in job.into_iter().enumerate() {
                let (line, column) = line_col(text, j.span().start);
                let spec = check(j.into_inner(), &format!("{default_name}-{i}"))?;
                if out.iter().any(|o| o.name == spec.name) {
                    return Err(SpecError::Parse {
                        line,
                        column,
                        message: format!("a second job named {:?}", spec.name),
                    });
                }
                out.push(spec);
            }
            out
        }
    };
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_job_with_every_key() {
        let t = r#"
name = "render"
command = ["./render", "--frame"]
count = 100
cpus = 1.5
mem = "512M"
pids = 256
retries = 3
image = "/srv/debian.tar"
inputs = ["scenes/", "render"]
output = "out/render"
after = ["build"]
"#;
        let j = parse(t, "job").unwrap();
        assert_eq!(j.len(), 1);
        let j = &j[0];
        assert_eq!(j.name, "render");
        assert_eq!(j.count, 100);
        assert_eq!(j.memory_bytes, Some(512 << 20));
        assert_eq!(j.retries, 3);
        assert_eq!(j.after, vec!["build".to_owned()]);
        let d = &parse("command = [\"true\"]\n", "mine").unwrap()[0];
        assert_eq!(
            (d.name.as_str(), d.count, d.retries, d.output.as_str()),
            ("mine", 1, 2, "shoal-out/mine")
        );
    }

    #[test]
    fn several_jobs_form_a_file() {
        let t = r#"
[[job]]
name = "build"
command = ["make"]

[[job]]
name = "test"
command = ["make", "check"]
count = 4
after = ["build"]
"#;
        let j = parse(t, "f").unwrap();
        assert_eq!(
            j.iter().map(|j| j.name.as_str()).collect::<Vec<_>>(),
            ["build", "test"]
        );
        let dup = "[[job]]\nname = \"a\"\ncommand = [\"x\"]\n\n[[job]]\nname = \"a\"\ncommand = [\"y\"]\n";
        let e = parse(dup, "f").unwrap_err();
        assert!(
            e.to_string().contains("line 5") && e.to_string().contains("\"a\""),
            "{e}"
        );
    }

    #[test]
    fn malformed_files_are_refused_with_line_and_column() {
        let e = parse("command = [\"x\"]\ncount = \"many\"\n", "j").unwrap_err();
        let SpecError::Parse { line, column, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!((*line, *column), (2, 9), "{e}");
        let e = parse("command = [\"x\"]\ncuont = 3\n", "j").unwrap_err();
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("cuont"),
            "{e}"
        );
        let e = parse("command = [\"x\"\n", "j").unwrap_err();
        assert!(matches!(e, SpecError::Parse { .. }), "{e}");
        let e = parse("count = 3\n", "j").unwrap_err();
        assert!(e.to_string().contains("command"), "{e}");
    }

    #[test]
    fn impossible_values_are_refused_naming_the_key() {
        for (t, key) in [
            ("command = []\n", "command"),
            ("command = [\"x\"]\ncount = 0\n", "count"),
            ("command = [\"x\"]\ncpus = 0.0\n", "cpus"),
            ("command = [\"x\"]\nmem = \"12Q\"\n", "mem"),
            ("command = [\"x\"]\nmem = \"1K\"\n", "mem"),
            ("command = [\"x\"]\npids = 0\n", "pids"),
            ("command = [\"x\"]\noutput = \"../x\"\n", "output"),
            ("command = [\"x\"]\ninputs = [\"/etc\"]\n", "inputs"),
            ("name = \"a b\"\ncommand = [\"x\"]\n", "name"),
            (
                "name = \"a\"\ncommand = [\"x\"]\nafter = [\"a\"]\n",
                "after",
            ),
        ] {
            let e = parse(t, "j").unwrap_err();
            assert!(
                matches!(&e, SpecError::Invalid { key: k, .. } if *k == key),
                "{t}: {e}"
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("lots").is_err());
    }
}
