//! Sliding anti-replay window (RFC 6479 style bitmap).

/// Packets this far behind the highest counter seen are refused.
pub(crate) const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// The counters seen from one sender session.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    top: u64,
    bits: [u64; WORDS],
    pub(crate) last_seen: u64,
}

impl Window {
    pub(crate) fn new() -> Self {
        Self {
            top: 0,
            bits: [0; WORDS],
            last_seen: 0,
        }
    }

    /// Accepts `counter` once: false if seen already or too old.
    pub(crate) fn accept(&mut self, counter: u64) -> bool {
        if counter == 0 {
            return false; // senders start at 1
        }
        if counter > self.top {
            let shift = counter - self.top;
            if shift >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for c in (self.top + 1)..=counter {
                    self.clear(c);
                }
            }
            self.top = counter;
            self.set(counter);
            return true;
        }
        if self.top - counter >= WINDOW {
            return false;
        }
        if self.get(counter) {
            return false;
        }
        self.set(counter);
        true
    }

    fn pos(c: u64) -> (usize, u64) {
        let slot = c % WINDOW;
        ((slot / 64) as usize, 1u64 << (slot % 64))
    }
    fn get(&self, c: u64) -> bool {
        let (w, b) = Self::pos(c);
        self.bits[w] & b != 0
    }
    fn set(&mut self, c: u64) {
        let (w, b) = Self::pos(c);
        self.bits[w] |= b;
    }
    fn clear(&mut self, c: u64) {
        let (w, b) = Self::pos(c);
        self.bits[w] &= !b;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn in_order_reordered_and_replayed() {
        let mut w = Window::new();
        assert!(w.accept(1));
        assert!(w.accept(3));
        assert!(w.accept(2));
        assert!(!w.accept(2));
        assert!(!w.accept(3));
        assert!(w.accept(3 + WINDOW));
        assert!(!w.accept(3), "fell out of the window");
        assert!(w.accept(4 + WINDOW));
        assert!(!w.accept(0));
    }

    proptest! {
        /// Against a model that remembers everything: the window accepts a
        /// counter iff the model has not seen it, unless it is too old.
        #[test]
        fn matches_model(seq in proptest::collection::vec(1u64..3000, 1..400)) {
            let mut w = Window::new();
            let mut seen = std::collections::HashSet::new();
            let mut top = 0u64;
            for c in seq {
                let fresh = !seen.contains(&c);
                let old = top >= WINDOW && c <= top - WINDOW;
                let got = w.accept(c);
                if old {
                    prop_assert!(!got);
                } else {
                    prop_assert_eq!(got, fresh, "counter {}", c);
                }
                if got {
                    seen.insert(c);
                    top = top.max(c);
                }
            }
        }
    }
}
