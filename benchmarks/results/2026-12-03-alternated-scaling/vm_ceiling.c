// The VM's own 2-thread ceiling: a compute-bound AVX-512 FMA loop, an L2-resident stream and a DRAM stream,
// each on 1 then 2 threads, six rounds. Build and run: gcc -O2 -march=native -fopenmp vm_ceiling.c -o /tmp/c && /tmp/c
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
static double now(){return omp_get_wtime();}
// compute-bound: 8 independent FMA chains on 16 floats each
static float compute(long iters){
  __m512 a[8]; for(int i=0;i<8;i++) a[i]=_mm512_set1_ps(1.0f+i*1e-3f);
  __m512 m=_mm512_set1_ps(0.999999f), c=_mm512_set1_ps(1e-7f);
  for(long k=0;k<iters;k++) for(int i=0;i<8;i++) a[i]=_mm512_fmadd_ps(a[i],m,c);
  __m512 s=a[0]; for(int i=1;i<8;i++) s=_mm512_add_ps(s,a[i]); return _mm512_reduce_add_ps(s);
}
static float stream(float* buf, long n, int reps){
  __m512 s=_mm512_setzero_ps();
  for(int r=0;r<reps;r++) for(long i=0;i<n;i+=16) s=_mm512_add_ps(s,_mm512_loadu_ps(buf+i));
  return _mm512_reduce_add_ps(s);
}
int main(int argc,char**argv){
  long total_iters=200000000/8; // work split over threads
  long l2n=128*1024/4*2;  // 256 KB per thread... per-thread buffer
  long dn=64L*1024*1024;  // 256 MB total for DRAM
  float* dram=aligned_alloc(64,dn*4); for(long i=0;i<dn;i++) dram[i]=1e-6f*(i&1023);
  float* l2b[2]; for(int t=0;t<2;t++){l2b[t]=aligned_alloc(64,l2n*4); for(long i=0;i<l2n;i++) l2b[t][i]=1e-6f;}
  volatile float sink=0;
  for(int round=0;round<6;round++){
    for(int nt=1;nt<=2;nt++){
      double t0=now();
      #pragma omp parallel num_threads(nt) reduction(+:sink)
      { sink+=compute(total_iters/nt); }
      double tc=now()-t0;
      t0=now();
      #pragma omp parallel num_threads(nt) reduction(+:sink)
      { int t=omp_get_thread_num(); sink+=stream(l2b[t],l2n,4000/nt); }
      double tl=now()-t0;
      t0=now();
      #pragma omp parallel num_threads(nt) reduction(+:sink)
      { int t=omp_get_thread_num(); long chunk=dn/nt; for(int r=0;r<4;r++) sink+=stream(dram+t*chunk,chunk,1); }
      double td=now()-t0;
      printf("round %d nt %d compute %.1f ms  L2 %.1f ms  DRAM %.1f ms (%.1f GB/s)\n",round,nt,tc*1e3,tl*1e3,td*1e3,4.0*dn*4/td/1e9);
    }
  }
  return 0;
}
