//! One module per subcommand.

pub mod agent;
pub mod cancel;
pub mod jobs;
pub mod keygen;
pub mod leave;
pub mod logs;
pub mod nodes;
pub mod owner;
pub mod ps;
pub mod retry;
pub mod run;
pub mod spawner;
pub mod status;
pub mod submit;
pub mod wait;

/// A text table: a header and rows, columns padded, the last one free.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s += c;
            } else {
                s += &format!("{c:<width$}  ", width = w.get(i).copied().unwrap_or(0));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(&head.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    for r in rows {
        out += &line(r);
    }
    out
}
