//! A recording stand-in for [`CgroupManager`], for tests without root.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{check_name, CgroupError, CgroupManager, CgroupVersion, GuestClass, Limits, Usage};

/// One call made to the fake.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `create(name, limits)`.
    Create(String, Limits),
    /// `attach(name, pid)`.
    Attach(String, u32),
    /// `set_frozen(name, frozen)`.
    Freeze(String, bool),
    /// `kill_all(name)`.
    Kill(String),
    /// `remove(name)`.
    Remove(String),
    /// `set_cpus(name, cpus)`.
    Cpus(String, Option<f64>),
    /// `signal_all(name, signal)`.
    Signal(String, i32),
    /// `guest_class()`.
    GuestClass,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<Call>,
    groups: BTreeMap<String, (Limits, Vec<u32>, bool)>,
    /// Removals still to refuse (as a cgroup whose processes have not
    /// died yet).
    busy_removes: usize,
}

/// Records every call and keeps the groups in memory.
#[derive(Debug, Default)]
pub struct Recording {
    state: Mutex<State>,
}

impl Recording {
    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The next `n` removals fail as busy (their processes not dead yet).
    pub fn refuse_removes(&self, n: usize) {
        self.lock().busy_removes = n;
    }

    /// Whether group `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        self.lock().groups.contains_key(name)
    }

    /// Whether `name` is frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.lock().groups.get(name).is_some_and(|g| g.2)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with<T>(
        &self,
        name: &str,
        call: Call,
        f: impl FnOnce(&mut (Limits, Vec<u32>, bool)) -> T,
    ) -> Result<T, CgroupError> {
        check_name(name)?;
        let mut s = self.lock();
        s.calls.push(call);
        s.groups
            .get_mut(name)
            .map(f)
            .ok_or_else(|| CgroupError::Io {
                path: name.into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
    }
}

impl CgroupManager for Recording {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        check_name(name)?;
        limits.validate()?;
        let mut s = self.lock();
        s.calls.push(Call::Create(name.to_owned(), limits.clone()));
        if s.groups.contains_key(name) {
            return Err(CgroupError::Exists(name.to_owned()));
        }
        s.groups
            .insert(name.to_owned(), (limits.clone(), Vec::new(), false));
        Ok(())
    }

    fn attach(&self, name: &str, pid: u32) -> Result<(), CgroupError> {
        self.with(name, Call::Attach(name.to_owned(), pid), |g| g.1.push(pid))
    }

    fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), CgroupError> {
        self.with(name, Call::Freeze(name.to_owned(), frozen), |g| {
            g.2 = frozen
        })
    }

    fn pids(&self, name: &str) -> Result<Vec<u32>, CgroupError> {
        check_name(name)?;
        Ok(self
            .lock()
            .groups
            .get(name)
            .map(|g| g.1.clone())
            .unwrap_or_default())
    }

    fn kill_all(&self, name: &str) -> Result<(), CgroupError> {
        self.with(name, Call::Kill(name.to_owned()), |g| g.1.clear())
    }

    fn usage(&self, name: &str) -> Result<Usage, CgroupError> {
        check_name(name)?;
        Ok(Usage::default())
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        check_name(name)?;
        let mut s = self.lock();
        s.calls.push(Call::Remove(name.to_owned()));
        if s.busy_removes > 0 {
            s.busy_removes -= 1;
            return Err(CgroupError::Busy(name.to_owned()));
        }
        s.groups.remove(name);
        Ok(())
    }

    fn remove_parent(&self) -> Result<(), CgroupError> {
        Ok(())
    }

    fn set_cpus(&self, name: &str, cpus: Option<f64>) -> Result<(), CgroupError> {
        super::check_cpus(cpus)?;
        self.with(name, Call::Cpus(name.to_owned(), cpus), |g| g.0.cpus = cpus)
    }

    fn guest_class(&self) -> Result<GuestClass, CgroupError> {
        self.lock().calls.push(Call::GuestClass);
        Ok(GuestClass::CpuIdle)
    }

    fn parent_cpu_usec(&self) -> Result<u64, CgroupError> {
        Ok(0)
    }

    fn signal_all(&self, name: &str, signal: nix::sys::signal::Signal) -> Result<(), CgroupError> {
        self.with(name, Call::Signal(name.to_owned(), signal as i32), |_| ())
    }

    fn procs_files(&self, _name: &str) -> Vec<PathBuf> {
        Vec::new()
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        Ok(self.lock().groups.keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_calls_and_state() {
        let f = Recording::default();
        f.create("a", &Limits::default()).unwrap();
        f.attach("a", 7).unwrap();
        f.set_frozen("a", true).unwrap();
        assert!(f.is_frozen("a"));
        assert_eq!(f.pids("a").unwrap(), vec![7]);
        f.remove("a").unwrap();
        assert!(f.attach("a", 8).is_err());
        assert_eq!(
            f.calls()[..3],
            [
                Call::Create("a".into(), Limits::default()),
                Call::Attach("a".into(), 7),
                Call::Freeze("a".into(), true)
            ]
        );
    }
}
