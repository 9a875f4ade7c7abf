// The kernel floor of one workspace task on this machine, for
// BENCHMARKS.md: per task, what a warm slot's spawner does at the least
// (fork a supervisor, unshare the mount, pid, uts and ipc namespaces, fork
// pid 1, which forks and execs /bin/true; all waited for), with none of
// shoal's own work. Needs root.
//
//   gcc -O2 -o /tmp/task-floor scripts/task-floor.c
//   /tmp/task-floor 2000 1 & /tmp/task-floor 2000 1; wait   # both cores
//
// Mode 0: fork and exec /bin/true only; mode 1: the workspace's processes
// and namespaces around it.
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void run_true(void) {
  pid_t p = fork();
  if (p == 0) {
    char *a[] = {"true", NULL};
    execv("/bin/true", a);
    _exit(127);
  }
  int st;
  waitpid(p, &st, 0);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: task-floor TASKS MODE\n");
    return 2;
  }
  int n = atoi(argv[1]), mode = atoi(argv[2]);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < n; i++) {
    if (mode == 0) {
      run_true();
      continue;
    }
    pid_t s = fork();
    if (s == 0) {
      if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC)) {
        perror("unshare");
        _exit(1);
      }
      pid_t p1 = fork();
      if (p1 == 0) {
        run_true();
        _exit(0);
      }
      int st;
      waitpid(p1, &st, 0);
      _exit(0);
    }
    int st;
    waitpid(s, &st, 0);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double d = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf("mode %d: %d tasks in %.2f s = %.0f/s\n", mode, n, d, n / d);
  return 0;
}
