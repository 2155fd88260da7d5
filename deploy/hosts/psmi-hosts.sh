#!/usr/bin/env bash
# psmi_dask on plain hosts: one runs `dask scheduler`, the others run
# `dask worker`, and any machine that reaches the scheduler runs the fit.
# Every host needs the same Python environment with psmi_dask installed
# (pip install "<clone of psmi_dask>[io]" of one commit), and the features and the
# output directory at the same path (a shared file system), because the
# workers read and write them directly.
#
#   on host A:            deploy/hosts/psmi-hosts.sh scheduler
#   on hosts B, C, ...:   deploy/hosts/psmi-hosts.sh worker tcp://A:8786
#   anywhere:             deploy/hosts/psmi-hosts.sh run tcp://A:8786 \
#                             /shared/features.zarr /shared/labels.npy \
#                             /shared/results/psmi.zarr [psmi-dask run options]
#   from host A, workers over ssh (hosts one a line in HOSTFILE):
#                         deploy/hosts/psmi-hosts.sh ssh-workers HOSTFILE tcp://A:8786
#
# Settings, from the environment:
#   PSMI_PORT           scheduler port (8786)
#   PSMI_HOST           address the scheduler or worker binds and announces
#   PSMI_NTHREADS       threads per worker (the host's cores)
#   PSMI_MEMORY_LIMIT   memory limit per worker ("auto": the host's memory)
#   PSMI_ENV            environment to activate on ssh workers
# Sizing: each worker thread holds chunk rows x block size x 8 bytes of
# projections plus its chunk of X at a time; see deploy/README.md.
set -euo pipefail

# One BLAS thread per Dask thread (the nanny does the same for its worker).
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

port="${PSMI_PORT:-8786}"
host_args=()
if [ -n "${PSMI_HOST:-}" ]; then
    host_args=(--host "$PSMI_HOST")
fi

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

worker_args() {
    local nthreads
    nthreads="${PSMI_NTHREADS:-$(nproc)}"
    printf '%s\n' --nworkers 1 --nthreads "$nthreads" \
        --memory-limit "${PSMI_MEMORY_LIMIT:-auto}"
}

case "${1:-}" in
scheduler)
    exec dask scheduler --port "$port" "${host_args[@]}"
    ;;
worker)
    [ "$#" -eq 2 ] || usage
    mapfile -t extra < <(worker_args)
    exec dask worker "$2" "${extra[@]}" "${host_args[@]}"
    ;;
run)
    [ "$#" -ge 5 ] || usage
    address="$2" features="$3" labels="$4" output="$5"
    shift 5
    exec psmi-dask run "$features" "$labels" -o "$output" --scheduler "$address" "$@"
    ;;
ssh-workers)
    [ "$#" -eq 3 ] || usage
    activate=""
    if [ -n "${PSMI_ENV:-}" ]; then
        activate="source $(printf '%q' "$PSMI_ENV/bin/activate") && "
    fi
    while read -r worker_host; do
        [ -z "$worker_host" ] || [ "${worker_host:0:1}" = "#" ] && continue
        echo "starting a worker on $worker_host" >&2
        # -n: leave the host list on stdin for the loop.
        ssh -n "$worker_host" "${activate}OMP_NUM_THREADS=1 nohup dask worker \
            $(printf '%q' "$3") --nworkers 1 \
            ${PSMI_NTHREADS:+--nthreads $PSMI_NTHREADS} \
            --memory-limit ${PSMI_MEMORY_LIMIT:-auto} \
            >psmi-worker.log 2>&1 </dev/null &"
    done <"$2"
    ;;
*)
    usage
    ;;
esac
