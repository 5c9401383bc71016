#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <immintrin.h>
int main(int argc,char**argv){ int T=atoi(argv[1]); size_t n=22u<<20; size_t big=400u<<20;
 float*a=aligned_alloc(64,n); float*e=aligned_alloc(64,big); memset(a,1,n); memset(e,1,big);
 size_t m=n/4; double bp=1e9,bn=1e9,hp=1e9,hn=1e9;
 for(int r=0;r<10;r++){
  memset(e,r,big);
  double t=omp_get_wtime();
  #pragma omp parallel for num_threads(T) schedule(static)
  for(size_t i=0;i<m;i+=8) _mm256_store_ps(a+i,_mm256_set1_ps(r));
  t=omp_get_wtime()-t; if(t<bp)bp=t;
  t=omp_get_wtime();
  #pragma omp parallel for num_threads(T) schedule(static)
  for(size_t i=0;i<m;i+=8) _mm256_store_ps(a+i,_mm256_set1_ps(r+1));
  t=omp_get_wtime()-t; if(t<hp)hp=t;
  memset(e,r,big);
  t=omp_get_wtime();
  #pragma omp parallel for num_threads(T) schedule(static)
  for(size_t i=0;i<m;i+=8) _mm256_stream_ps(a+i,_mm256_set1_ps(r));
  _mm_sfence();
  t=omp_get_wtime()-t; if(t<bn)bn=t;
  t=omp_get_wtime();
  #pragma omp parallel for num_threads(T) schedule(static)
  for(size_t i=0;i<m;i+=8) _mm256_stream_ps(a+i,_mm256_set1_ps(r+1));
  _mm_sfence();
  t=omp_get_wtime()-t; if(t<hn)hn=t;
 }
 printf("T=%d 22MB write: cold plain %.3f ms, hot plain %.3f, cold stream %.3f, hot stream %.3f\n",T,bp*1e3,hp*1e3,bn*1e3,hn*1e3);}
