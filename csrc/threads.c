/* The thread pool of the kernels (dsk.h): tasks claimed one at a time, and a caller that never
 * waits for a thread that has not started.
 *
 * Why not OpenMP and OpenBLAS's own threads: both split work statically and end each parallel
 * region in a barrier that every thread must reach. With more threads than free cores (a laptop
 * running a browser, a shared server) a thread that the OS has not scheduled holds the barrier,
 * and a training step has tens of regions: with one other process busy on one of 2 cores, the
 * 2-thread MMoE step ran 0.05-0.3x as fast as 1 thread (benchmarks/bench_threads.py). Here:
 *
 *   - a job is ntasks tasks; the caller and the workers claim them one at a time (an atomic
 *     counter), so a slow or descheduled thread holds at most the task it has claimed, and a
 *     worker that wakes after all tasks are claimed does nothing;
 *   - the caller waits only for tasks that were claimed, spinning briefly and then sleeping on a
 *     condition variable, so that its core is free for the thread it waits for;
 *   - idle workers spin briefly (DSELECTK_SPIN_US, 50 us by default, yielding the CPU between
 *     checks) and then sleep; back-to-back jobs of a step find them awake.
 *
 * Claims: one 64-bit word holds (generation << 32 | next task index). A worker claims task i of
 * generation g with a compare-and-swap, which fails if the caller has started a newer job since;
 * after a successful claim the job cannot complete before this task does, so its function and
 * context stay valid while the task runs. Before the caller writes a new job's fields it stores a
 * closed generation (no task claimable), so that no claim of the previous job's word can succeed
 * against the new task count (the sanitizer job caught one that did). The job's `done` counter is
 * reset only after the previous job completed, so no late increment reaches it.
 *
 * The vendored OpenBLAS is kept at one thread: products are split into tiles that run as tasks
 * (dsk_gemm.c), so that they never wait on a descheduled BLAS thread either. Calls from inside a
 * task, and calls from a second application thread while the pool is busy, run serially in the
 * calling thread. After fork() the child starts without workers and creates them on first use. */
#define _GNU_SOURCE /* pthread_atfork, sched_yield, clock_gettime on older glibc */
#include "dsk.h"

#include <cblas.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define DSK_CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define DSK_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define DSK_CPU_RELAX() ((void)0)
#endif

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)

static int dsk_num_threads = 1;

typedef struct {
    pthread_mutex_t lock;   /* guards the sleeping workers' and the waiting caller's conditions */
    pthread_cond_t wake;    /* workers sleep here until a new generation */
    pthread_cond_t done_cv; /* the caller sleeps here until done == ntasks */
    pthread_mutex_t submit; /* one job at a time; others run serially (trylock) */
    uint64_t claim;         /* generation << 32 | next task index */
    long ntasks;
    long done;
    dsk_task_fn fn;
    void *ctx;
    int participants;   /* worker ids < participants - 1 take part in the current job */
    int sleeping;       /* workers waiting on `wake` */
    int caller_waiting; /* the caller waits on `done_cv` */
    int nworkers;       /* started worker threads */
    uint32_t start_gen; /* the generation a new worker starts from: the last before the job it was made for */
    uint32_t generation;
    long spin_ns;
} DskPool;

static DskPool pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
                       PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, NULL, NULL, 1, 0, 0, 0, 0, 0, -1};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static __thread int in_task = 0; /* inside a task of the pool (or a serial fallback): nested calls run serially */

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Spins until cond(arg) or spin_ns have passed; 1 if cond held. Yields the CPU between checks so
 * that on a loaded machine the spinning costs the other threads of that core little. */
static int spin_until(int (*cond)(void *), void *arg) {
    if (cond(arg)) return 1;
    if (pool.spin_ns <= 0) return 0;
    const long start = now_ns();
    for (;;) {
        for (int i = 0; i < 64; i++) {
            DSK_CPU_RELAX();
            if (cond(arg)) return 1;
        }
        if (now_ns() - start > pool.spin_ns) return cond(arg);
        sched_yield();
    }
}

/* Runs unclaimed tasks of generation g until none is left; thread: the caller's id (0) or a
 * worker's (1 + its index). */
static void run_tasks(uint32_t g, int thread) {
    for (;;) {
        uint64_t c = __atomic_load_n(&pool.claim, __ATOMIC_ACQUIRE);
        if ((uint32_t)(c >> 32) != g) return;
        const long i = (long)(c & 0xffffffffu), n = __atomic_load_n(&pool.ntasks, __ATOMIC_ACQUIRE);
        if (i >= n) return;
        if (!__atomic_compare_exchange_n(&pool.claim, &c, c + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
        /* task i of generation g is ours: the job cannot finish before it, fn and ctx are its own */
        pool.fn(pool.ctx, i, thread);
        if (__atomic_add_fetch(&pool.done, 1, __ATOMIC_SEQ_CST) == n && LOAD(&pool.caller_waiting)) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done_cv);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

typedef struct {
    uint32_t last;
} NewJob;

static int new_generation(void *arg) {
    return (uint32_t)(__atomic_load_n(&pool.claim, __ATOMIC_ACQUIRE) >> 32) != ((NewJob *)arg)->last;
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg; /* 0-based worker index; its thread id in tasks is id + 1 */
    in_task = 1;
    /* not the generation current when this thread starts: that may already be the job it was
     * made for, which it would then skip (the caller runs every task itself meanwhile) */
    NewJob seen = {LOAD(&pool.start_gen)};
    for (;;) {
        if (!spin_until(new_generation, &seen)) {
            pthread_mutex_lock(&pool.lock);
            __atomic_add_fetch(&pool.sleeping, 1, __ATOMIC_SEQ_CST);
            while (!new_generation(&seen)) pthread_cond_wait(&pool.wake, &pool.lock);
            __atomic_sub_fetch(&pool.sleeping, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&pool.lock);
        }
        seen.last = (uint32_t)(LOAD(&pool.claim) >> 32);
        if (id < LOAD(&pool.participants) - 1) run_tasks(seen.last, id + 1);
    }
    return NULL;
}

static void after_fork_in_child(void) {
    /* the workers do not exist in the child: start over (mutexes and conditions re-created, as a
     * copy of a locked mutex cannot be used) */
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.submit, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done_cv, NULL);
    pool.nworkers = pool.sleeping = pool.caller_waiting = 0;
}

static void before_fork(void) { pthread_mutex_lock(&pool.submit); } /* no job runs across fork() */
static void after_fork_in_parent(void) { pthread_mutex_unlock(&pool.submit); }

static void pool_init(void) {
    const char *spin = getenv("DSELECTK_SPIN_US");
    long us = 50;
    if (spin && *spin) {
        char *end;
        const long v = strtol(spin, &end, 10);
        if (*end == '\0' && v >= 0 && v <= 1000000) us = v;
    }
    pool.spin_ns = us * 1000;
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
}

/* Starts workers up to `wanted` (fewer if the OS refuses threads: the job then runs on those). */
static void ensure_workers(int wanted) {
    if (pool.nworkers < wanted) STORE(&pool.start_gen, (uint32_t)(LOAD(&pool.claim) >> 32));
    while (pool.nworkers < wanted) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)pool.nworkers);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.nworkers++;
    }
}

static int all_done(void *arg) { return LOAD(&pool.done) >= *(const long *)arg; }

static void run_serially(long ntasks, dsk_task_fn fn, void *ctx) {
    const int outer = in_task;
    in_task = 1;
    for (long i = 0; i < ntasks; i++) fn(ctx, i, 0);
    in_task = outer;
}

void dsk_parallel_tasks(long ntasks, dsk_task_fn fn, void *ctx) { dsk_parallel_tasks_upto(ntasks, fn, ctx, dsk_num_threads); }

void dsk_parallel_tasks_upto(long ntasks, dsk_task_fn fn, void *ctx, int max_threads) {
    if (ntasks <= 0) return;
    const int threads = dsk_num_threads < max_threads ? dsk_num_threads : max_threads;
    if (ntasks == 1 || threads <= 1 || in_task || ntasks > 0xffffffffL) {
        run_serially(ntasks, fn, ctx);
        return;
    }
    pthread_once(&pool_once, pool_init);
    if (pthread_mutex_trylock(&pool.submit) != 0) { /* another thread's job is running */
        run_serially(ntasks, fn, ctx);
        return;
    }
    ensure_workers(threads - 1);
    if (pool.nworkers == 0) {
        pthread_mutex_unlock(&pool.submit);
        run_serially(ntasks, fn, ctx);
        return;
    }
    /* First close the previous job's generation: a worker still in run_tasks for it may have
     * loaded its claim word (all tasks claimed) and could read the new ntasks below; its
     * compare-and-swap on the old word would then succeed and run a task of this job that the
     * caller never counts. Against the closed word it fails, and a claim of the closed generation
     * finds no task (index 0xffffffff >= any ntasks). */
    const uint32_t closed = ++pool.generation;
    STORE(&pool.claim, (uint64_t)closed << 32 | 0xffffffffu);
    pool.fn = fn;
    pool.ctx = ctx;
    STORE(&pool.ntasks, ntasks);
    STORE(&pool.done, 0);
    STORE(&pool.participants, threads);
    const uint32_t g = ++pool.generation;
    STORE(&pool.claim, (uint64_t)g << 32); /* publishes the job */
    if (LOAD(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    in_task = 1;
    run_tasks(g, 0);
    in_task = 0;
    if (!spin_until(all_done, &ntasks)) {
        pthread_mutex_lock(&pool.lock);
        STORE(&pool.caller_waiting, 1);
        while (LOAD(&pool.done) < ntasks) pthread_cond_wait(&pool.done_cv, &pool.lock);
        STORE(&pool.caller_waiting, 0);
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.submit);
}

/* dsk_parallel_for: [0, n) in consecutive chunks, as tasks. */
typedef struct {
    dsk_range_fn fn;
    void *ctx;
    long n, chunk;
} RangeJob;

static void range_task(void *arg, long task, int thread) {
    const RangeJob *job = arg;
    const long lo = task * job->chunk, hi = lo + job->chunk < job->n ? lo + job->chunk : job->n;
    (void)thread;
    job->fn(job->ctx, lo, hi);
}

long dsk_chunks(long n, long grain) {
#if DSK_PARALLEL_MIN_WORK == 0
    grain = 1; /* the sanitizer build: everything threaded (dsk.h) */
#endif
    if (grain < 1) grain = 1;
    const long most = n / grain, limit = (long)DSK_TASKS_PER_THREAD * dsk_num_threads;
    return most < 1 ? 1 : most < limit ? most : limit;
}

void dsk_parallel_for(long n, long grain, dsk_range_fn fn, void *ctx) {
    if (n <= 0) return;
    const long chunks = dsk_num_threads > 1 && !in_task ? dsk_chunks(n, grain) : 1;
    if (chunks <= 1) {
        const int outer = in_task;
        in_task = 1;
        fn(ctx, 0, n);
        in_task = outer;
        return;
    }
    RangeJob job = {fn, ctx, n, (n + chunks - 1) / chunks};
    dsk_parallel_tasks((n + job.chunk - 1) / job.chunk, range_task, &job);
}

int dsk_get_num_threads(void) { return dsk_num_threads; }

void dsk_set_num_threads(int n) {
    if (n < 1) n = 1;
    dsk_num_threads = n;
    scipy_openblas_set_num_threads(1); /* products are split by the pool (dsk_gemm.c) */
}

int dsk_blas_get_num_threads(void) { return scipy_openblas_get_num_threads(); }

int dsk_pool_workers(void) { return pool.nworkers; }

int dsk_can_parallelize(void) { return dsk_num_threads > 1 && !in_task; }
