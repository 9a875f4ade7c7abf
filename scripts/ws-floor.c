// The floor of one build compile in a workspace, for BENCHMARKS.md: per
// command, only the kernel work a workspace needs at the least, none of
// shoal's (no agent, no network, no contents by hash, no manifest): a child
// cloned into new mount, pid, uts and ipc namespaces, an overlay mounted
// over the current directory (its upper layer and work directory beside
// it, or in WS_FLOOR_BASE), the command run by that pid 1 and waited for,
// then the upper layer's new regular files renamed (or, from another file
// system, copied) into the directory (the commit) and the layer removed.
// The cgroup is the caller's: scripts/build-floor runs `make` in one made
// ahead, as shoal's warm slots start tasks in theirs. Needs root.
//
//   gcc -O2 -o /tmp/ws-floor scripts/ws-floor.c
//   make -j4 CC="/tmp/ws-floor gcc"
//
// WS_FLOOR_NS=0 leaves out the namespaces and the overlay (the command
// writes in place: only the extra processes remain); WS_FLOOR_OVL=0 only
// the overlay; WS_FLOOR_OVL=volatile mounts it `volatile` (no sync of the
// upper file system when it goes).
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static char cwd[PATH_MAX], base[PATH_MAX], up[PATH_MAX + 8], wk[PATH_MAX + 8];
static char **cmd;

static void die(const char *what) {
  perror(what);
  _exit(125);
}

// A file on another file system (WS_FLOOR_BASE) comes in as a copy made
// beside its place and renamed there.
static void copy_in(const char *from, const char *to) {
  char tmp[2 * PATH_MAX + 8], buf[65536];
  snprintf(tmp, sizeof tmp, "%s.wsf", to);
  int in = open(from, O_RDONLY), out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (in < 0 || out < 0) die("copy");
  ssize_t n;
  while ((n = read(in, buf, sizeof buf)) > 0)
    if (write(out, buf, n) != n) die("copy");
  if (n < 0) die("copy");
  close(in);
  close(out);
  if (rename(tmp, to)) die("rename");
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: ws-floor CMD [ARGS...]\n");
    return 2;
  }
  cmd = argv + 1;
  if (!getcwd(cwd, sizeof cwd)) die("getcwd");
  const char *where = getenv("WS_FLOOR_BASE");
  if (where)
    snprintf(base, sizeof base, "%s/.wsf-%d", where, getpid());
  else
    snprintf(base, sizeof base, "%s/../.wsf-%d", cwd, getpid());
  snprintf(up, sizeof up, "%s/u", base);
  snprintf(wk, sizeof wk, "%s/w", base);
  if (mkdir(base, 0700) || mkdir(up, 0755) || mkdir(wk, 0700)) die("mkdir");
  const char *ns = getenv("WS_FLOOR_NS");
  int with_ns = !ns || strcmp(ns, "0");
  int flags = with_ns ? CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC : 0;
  pid_t c = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
  if (c < 0) die("clone");
  if (c == 0) {
    if (with_ns) {
      if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) die("make-private");
      const char *ovl = getenv("WS_FLOOR_OVL");
      char opts[3 * PATH_MAX + 64];
      snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s%s", cwd, up, wk,
               ovl && !strcmp(ovl, "volatile") ? ",volatile" : "");
      if ((!ovl || strcmp(ovl, "0")) && mount("overlay", cwd, "overlay", 0, opts)) die("overlay");
      if (chdir(cwd)) die("chdir");
    }
    pid_t g = fork();
    if (g == 0) {
      execvp(cmd[0], cmd);
      _exit(127);
    }
    int st;
    if (waitpid(g, &st, 0) < 0) die("wait");
    _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
  }
  int st;
  if (waitpid(c, &st, 0) < 0) die("wait");
  int code = WIFEXITED(st) ? WEXITSTATUS(st) : 125;
  DIR *d = opendir(up);
  if (!d) die("opendir");
  struct dirent *e;
  while ((e = readdir(d))) {
    char from[2 * PATH_MAX], to[2 * PATH_MAX];
    if (e->d_type != DT_REG) continue;
    snprintf(from, sizeof from, "%s/%s", up, e->d_name);
    snprintf(to, sizeof to, "%s/%s", cwd, e->d_name);
    if (code == 0 && rename(from, to)) {
      if (errno != EXDEV) die("rename");
      copy_in(from, to);
      unlink(from);
    }
    if (code != 0) unlink(from);
  }
  closedir(d);
  char wwork[PATH_MAX + 16];
  snprintf(wwork, sizeof wwork, "%s/work", wk);
  char inc[PATH_MAX + 64];
  snprintf(inc, sizeof inc, "%s/incompat/volatile/dirty", wwork);
  if (!access(inc, F_OK)) { // left by `volatile`
    unlink(inc);
    snprintf(inc, sizeof inc, "%s/incompat/volatile", wwork);
    rmdir(inc);
    snprintf(inc, sizeof inc, "%s/incompat", wwork);
    rmdir(inc);
  }
  rmdir(wwork);
  if (rmdir(wk) || rmdir(up) || rmdir(base)) die("rmdir");
  return code;
}
