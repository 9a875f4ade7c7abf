//! `--image`: a root filesystem shipped by content hash and recreated
//! exactly on the executor, for `shoal run` and for batch jobs (root, on
//! network namespaces; elsewhere the test prints why it skipped).

#![allow(clippy::unwrap_used)] // tests panic on purpose

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use shoal_netns::wait_for;

/// A static program that prints, for each path, its mode, owner, group
/// and first line (when the guest may read it), or "absent".
const PROBE: &str = r#"
#include <stdio.h>
#include <sys/stat.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (lstat(argv[i], &st)) { printf("%s absent\n", argv[i]); continue; }
        printf("%s %o %d %d", argv[i], st.st_mode & 07777, st.st_uid, st.st_gid);
        FILE *f = S_ISREG(st.st_mode) ? fopen(argv[i], "r") : NULL;
        char line[128];
        if (f && fgets(line, sizeof line, f)) printf(" %s", line); else printf("\n");
        if (f) fclose(f);
    }
    return 0;
}
"#;

/// A small root filesystem: the probe (static), a merged-usr `bin`
/// link, files with modes and owners worth checking, nothing else.
fn make_image(dir: &Path) -> Option<PathBuf> {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("opt/tool")).unwrap();
    std::fs::write(dir.join("probe.c"), PROBE).unwrap();
    let cc = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(root.join("usr/bin/probe"))
        .arg(dir.join("probe.c"))
        .output();
    match cc {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIP: gcc -static failed (libc6-dev?): {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Err(e) => {
            eprintln!("SKIP: no gcc ({e})");
            return None;
        }
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    std::fs::write(root.join("etc/motd"), "from the image\n").unwrap();
    std::fs::write(root.join("etc/secret"), "image secret\n").unwrap();
    std::fs::set_permissions(root.join("etc/secret"), PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(root.join("etc/secret"), Some(4321), Some(4321)).unwrap();
    std::fs::write(root.join("opt/tool/data"), "tool data\n").unwrap();
    std::fs::set_permissions(root.join("opt/tool/data"), PermissionsExt::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(root.join("opt/tool/data"), Some(0), Some(65534)).unwrap();
    Some(root)
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The bytes `shoal run -v` says it shipped.
fn shipped(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("shoal: shipped ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no shipped line in {stderr}"))
}

const PROBED: &[&str] = &[
    "/etc/motd",
    "/etc/secret",
    "/opt/tool/data",
    "/usr/bin/gcc",
    "/bin/sh",
];

fn expected() -> String {
    [
        "/etc/motd 644 0 0 from the image",
        // The guest (nobody) may not read it: mode and owner kept.
        "/etc/secret 600 4321 4321",
        // Group nogroup may read it: the guest's group.
        "/opt/tool/data 640 0 65534 tool data",
        // Nothing of the host's system.
        "/usr/bin/gcc absent",
        "/bin/sh absent",
    ]
    .join("\n")
        + "\n"
}

#[test]
fn an_image_is_shipped_once_recreated_exactly_and_used_by_runs_and_jobs() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("img1", 30, 2) else {
        return;
    };
    let all = [0, 1];
    start_all(&mut lab, &all, &[]);
    wait_alive(&lab, &all, &all, Duration::from_secs(20));
    lab.wait_ready(0, 2, Duration::from_secs(10))
        .expect("facts from every node");
    let work = lab.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let Some(root) = make_image(&lab.dir) else {
        return;
    };
    let root_s = root.to_str().unwrap();

    // First run on h1: the image crosses; what the task sees is the
    // image, exactly, and nothing of the host's system.
    let mut args = vec![
        "run", "-v", "--node", "h1", "--image", root_s, "--", "probe",
    ];
    args.extend_from_slice(PROBED);
    let o = shoal(&lab, &work, &args);
    assert_eq!(o.status.code(), Some(0), "{}", s(&o.stderr));
    assert_eq!(s(&o.stdout), expected());
    let first = shipped(&s(&o.stderr));
    assert!(first > 500_000, "the static probe was shipped: {first}");

    // Second run: nothing crosses.
    let o = shoal(&lab, &work, &args);
    assert_eq!(s(&o.stdout), expected());
    assert_eq!(shipped(&s(&o.stderr)), 0, "{}", s(&o.stderr));

    // The same tree as a tarball (GNU tar, numeric owners) is the same
    // image: still nothing crosses, and the task sees the same.
    let tar = lab.dir.join("rootfs.tar.gz");
    let t = Command::new("tar")
        .args(["--numeric-owner", "-czf"])
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .unwrap();
    assert!(t.success());
    let tar_s = tar.to_str().unwrap();
    let mut targs = vec!["run", "-v", "--node", "h1", "--image", tar_s, "--", "probe"];
    targs.extend_from_slice(PROBED);
    let o = shoal(&lab, &work, &targs);
    assert_eq!(s(&o.stdout), expected(), "{}", s(&o.stderr));
    assert_eq!(shipped(&s(&o.stderr)), 0, "{}", s(&o.stderr));

    // A command the image lacks is the shell's 127.
    let o = shoal(
        &lab,
        &work,
        &[
            "run", "--node", "h1", "--image", root_s, "--", "sh", "-c", "true",
        ],
    );
    assert_eq!(o.status.code(), Some(127), "{}", s(&o.stderr));
    assert!(
        s(&o.stderr).contains("sh: command not found"),
        "{}",
        s(&o.stderr)
    );

    // Bad images: one clear line, exit 2, nothing run.
    let o = shoal(
        &lab,
        &work,
        &["run", "--image", "/no/such/image", "--", "true"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(s(&o.stderr).contains("/no/such/image"), "{}", s(&o.stderr));
    let o = shoal(
        &lab,
        &work,
        &["run", "--image", work.to_str().unwrap(), "--", "true"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        s(&o.stderr).contains("not a root filesystem"),
        "{}",
        s(&o.stderr)
    );

    // A batch job in the image (relative path, from the job's directory).
    std::fs::rename(&root, work.join("rootfs")).unwrap();
    let o = shoal(
        &lab,
        &work,
        &[
            "submit",
            "--name",
            "imgjob",
            "--count",
            "3",
            "--image",
            "rootfs",
            "--",
            "probe",
            "/etc/motd",
            "/bin/sh",
        ],
    );
    assert!(o.status.success(), "{}", s(&o.stderr));
    let id = s(&o.stdout).trim().to_owned();
    let o = shoal(&lab, &work, &["wait", &id]);
    assert!(o.status.success(), "{}{}", s(&o.stdout), s(&o.stderr));
    for i in 0..3 {
        let out = work.join(format!("shoal-out/imgjob/{i}/stdout"));
        let got = wait_for(Duration::from_secs(5), || {
            std::fs::read_to_string(&out).ok()
        })
        .unwrap_or_else(|| panic!("{} missing", out.display()));
        assert_eq!(got, "/etc/motd 644 0 0 from the image\n/bin/sh absent\n");
    }
    let o = shoal(
        &lab,
        &work,
        &["submit", "--image", "nowhere.tar", "--", "true"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(s(&o.stderr).contains("nowhere.tar"), "{}", s(&o.stderr));
}
