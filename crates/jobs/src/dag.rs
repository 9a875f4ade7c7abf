//! Dependencies between jobs.

use std::collections::{BTreeMap, BTreeSet};

/// Why a set of jobs cannot be ordered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DagError {
    /// `after` names a job that does not exist.
    #[error("job {job:?} waits for {missing:?}, which is not a job")]
    Unknown {
        /// The waiting job.
        job: String,
        /// The name it gives.
        missing: String,
    },
    /// The jobs wait for each other in a circle.
    #[error("dependency cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
}

/// Checks that every `after` names a job in `jobs` (name → its `after`)
/// and that there is no cycle; returns an order in which every job comes
/// after those it waits for (ties by name, so the order is stable).
///
/// # Errors
/// An unknown name, or a cycle (spelled out, first job repeated at the end).
pub fn order(jobs: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>, DagError> {
    for (j, after) in jobs {
        if let Some(m) = after.iter().find(|a| !jobs.contains_key(*a)) {
            return Err(DagError::Unknown {
                job: j.clone(),
                missing: m.clone(),
            });
        }
    }
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::with_capacity(jobs.len());
    while out.len() < jobs.len() {
        let ready: Vec<&String> = jobs
            .iter()
            .filter(|(j, after)| {
                !done.contains(j.as_str()) && after.iter().all(|a| done.contains(a.as_str()))
            })
            .map(|(j, _)| j)
            .collect();
        if ready.is_empty() {
            return Err(DagError::Cycle(find_cycle(jobs, &done)));
        }
        for j in ready {
            done.insert(j);
            out.push(j.clone());
        }
    }
    Ok(out)
}

/// A cycle among the jobs not yet ordered (every one of them waits for
/// another of them, so walking `after` links must come back).
fn find_cycle(jobs: &BTreeMap<String, Vec<String>>, done: &BTreeSet<&str>) -> Vec<String> {
    let Some(start) = jobs.keys().find(|j| !done.contains(j.as_str())) else {
        return Vec::new();
    };
    let mut path: Vec<String> = vec![start.clone()];
    loop {
        let cur = path.last().cloned().unwrap_or_default();
        let next = jobs
            .get(&cur)
            .and_then(|a| a.iter().find(|n| !done.contains(n.as_str())))
            .cloned()
            .unwrap_or_default();
        if let Some(i) = path.iter().position(|p| *p == next) {
            let mut c = path.split_off(i);
            c.push(next);
            // Spelled in the direction of waiting: a waits for b …
            return c;
        }
        path.push(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn jobs(v: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        v.iter()
            .map(|(j, a)| ((*j).to_owned(), a.iter().map(|s| (*s).to_owned()).collect()))
            .collect()
    }

    #[test]
    fn a_chain_runs_in_order() {
        let o = order(&jobs(&[
            ("test", &["build"]),
            ("build", &[]),
            ("ship", &["test", "build"]),
        ]))
        .unwrap();
        assert_eq!(o, ["build", "test", "ship"]);
    }

    #[test]
    fn unknown_names_and_cycles_are_refused() {
        let e = order(&jobs(&[("a", &["nope"])])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "job \"a\" waits for \"nope\", which is not a job"
        );
        let e = order(&jobs(&[
            ("a", &["b"]),
            ("b", &["c"]),
            ("c", &["a"]),
            ("d", &[]),
        ]))
        .unwrap_err();
        assert_eq!(
            e,
            DagError::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        assert!(e.to_string().contains("a → b → c → a"));
    }

    proptest! {
        /// Any acyclic set of jobs (edges only to earlier names) is ordered
        /// with every job after what it waits for; adding one edge back to
        /// a job's own descendant is always reported as a cycle.
        #[test]
        fn orders_every_dag_and_finds_every_cycle(
            edges in proptest::collection::vec((0usize..12, 0usize..12), 0..30)
        ) {
            let name = |i: usize| format!("j{i:02}");
            let mut g: BTreeMap<String, Vec<String>> = (0..12).map(|i| (name(i), Vec::new())).collect();
            for (a, b) in &edges {
                if a > b {
                    g.get_mut(&name(*a)).unwrap().push(name(*b));
                }
            }
            let o = order(&g).unwrap();
            let pos = |j: &str| o.iter().position(|x| x == j).unwrap();
            for (j, after) in &g {
                for a in after {
                    prop_assert!(pos(a) < pos(j));
                }
            }
            if let Some((a, b)) = edges.iter().find(|(a, b)| a > b) {
                g.get_mut(&name(*b)).unwrap().push(name(*a));
                let e = order(&g);
                prop_assert!(matches!(e, Err(DagError::Cycle(_))), "{:?}", e);
            }
        }
    }
}
