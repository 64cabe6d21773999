/*
 * The library's own thread pool.
 *
 * Waking a parked thread costs 0.1-0.7 ms on small shared VMs, more than a whole
 * decode step of a small model. So workers spin while a step runs (barriers
 * between ops are spin barriers), keep spinning for a short while after a step
 * (the next token's step usually follows within microseconds), and only then
 * park on a condition variable. A step that runs on one thread never touches the
 * pool, so parked workers stay parked.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "llm.h"

/* How long a worker spins after a step before parking. */
#define SPIN_AFTER_STEP_NS 3000000L

struct llm_pool {
  int nthreads; /* including the caller */
  pthread_t *threads;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  atomic_uint gen; /* bumped once per task */
  atomic_int quit;
  atomic_int sleepers;
  atomic_int active; /* workers not yet done with the current task */
  llm_task task;
  void *arg;
  int nth;
  /* Sense-reversing barrier, on their own cache lines. */
  _Alignas(64) atomic_int bar_count;
  _Alignas(64) atomic_uint bar_phase;
};

typedef struct {
  llm_pool *pool;
  int ith;
} worker_arg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

static long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *worker_main(void *p) {
  worker_arg wa = *(worker_arg *)p;
  free(p);
  llm_pool *pool = wa.pool;
  unsigned seen = 0; /* gen starts at 0; a task may be posted before this thread runs */
  for (;;) {
    long t0 = now_ns();
    unsigned spins = 0;
    while (atomic_load(&pool->gen) == seen && !atomic_load(&pool->quit)) {
      cpu_relax();
      if ((++spins & 1023) == 0 && now_ns() - t0 > SPIN_AFTER_STEP_NS) {
        pthread_mutex_lock(&pool->mu);
        atomic_fetch_add(&pool->sleepers, 1);
        while (atomic_load(&pool->gen) == seen && !atomic_load(&pool->quit)) pthread_cond_wait(&pool->cv, &pool->mu);
        atomic_fetch_sub(&pool->sleepers, 1);
        pthread_mutex_unlock(&pool->mu);
      }
    }
    if (atomic_load(&pool->quit)) break;
    seen = atomic_load(&pool->gen);
    if (wa.ith < pool->nth) pool->task(pool->arg, wa.ith, pool->nth);
    atomic_fetch_sub(&pool->active, 1);
  }
  return NULL;
}

llm_pool *pool_create(int nthreads) {
  if (nthreads < 1) nthreads = 1;
  llm_pool *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->nthreads = nthreads;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv, NULL);
  p->threads = calloc((size_t)nthreads, sizeof(pthread_t));
  if (!p->threads) {
    free(p);
    return NULL;
  }
  for (int i = 1; i < nthreads; i++) {
    worker_arg *wa = malloc(sizeof *wa);
    if (!wa) {
      p->nthreads = i;
      break;
    }
    wa->pool = p;
    wa->ith = i;
    if (pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
      free(wa);
      p->nthreads = i; /* run with the threads we got */
      break;
    }
  }
  return p;
}

void pool_destroy(llm_pool *p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  atomic_store(&p->quit, 1);
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  for (int i = 1; i < p->nthreads; i++) pthread_join(p->threads[i], NULL);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->cv);
  free(p->threads);
  free(p);
}

int pool_size(const llm_pool *p) { return p ? p->nthreads : 1; }

void pool_run(llm_pool *p, llm_task task, void *arg, int nth) {
  if (!p || nth <= 1 || p->nthreads <= 1) {
    task(arg, 0, 1);
    return;
  }
  if (nth > p->nthreads) nth = p->nthreads;
  p->task = task;
  p->arg = arg;
  p->nth = nth;
  atomic_store(&p->bar_count, 0);
  atomic_store(&p->active, p->nthreads - 1);
  atomic_fetch_add(&p->gen, 1); /* seq_cst: pairs with the sleepers check in worker_main */
  if (atomic_load(&p->sleepers) > 0) {
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
  }
  task(arg, 0, nth);
  unsigned spins = 0;
  while (atomic_load(&p->active) > 0) {
    cpu_relax();
    if ((++spins & 4095) == 0) sched_yield();
  }
}

void pool_barrier(llm_pool *p, int nth) {
  if (!p || nth <= 1) return;
  unsigned phase = atomic_load(&p->bar_phase);
  if (atomic_fetch_add(&p->bar_count, 1) == nth - 1) {
    atomic_store(&p->bar_count, 0);
    atomic_fetch_add(&p->bar_phase, 1);
    return;
  }
  unsigned spins = 0;
  while (atomic_load(&p->bar_phase) == phase) {
    cpu_relax();
    /* Yield now and then: on an oversubscribed machine the thread we wait for may need our core. */
    if ((++spins & 4095) == 0) sched_yield();
  }
}
