"""Names shared by the operator and the trainer: env vars, labels, ports, paths, exit codes.

One module so both sides agree (kubeflow trainer's constants.go is the model).
"""

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAME = "ftj"

# Exit codes. 2 is never retried; RETRY asks the Job controller to restart the pod.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# The fine-tuned model missed spec.evaluation.minImprovement on the test split: nothing published. Never retried:
# a rerun of the same data and spec trains the same model (reason NotImproved in the termination message).
EXIT_NOT_IMPROVED = 3
EXIT_RETRY = 75  # EX_TEMPFAIL: preempted after a checkpoint, safe to restart
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT) after a checkpoint: run the same command to resume

# Environment the operator sets on trainer pods (torchrun rendezvous + our own).
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_NNODES = "NNODES"
ENV_NODE_RANK = "NODE_RANK"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
ENV_SPEC_PATH = "KUBETUNE_SPEC_PATH"
ENV_WORK_DIR = "KUBETUNE_WORK_DIR"
ENV_METRICS_PORT = "KUBETUNE_METRICS_PORT"
ENV_METRICS_LINGER = "KUBETUNE_METRICS_LINGER_SECONDS"  # keep /metrics up this long after the end (last scrape)
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"
ENV_JOB_NAME = "KUBETUNE_JOB_NAME"
ENV_NAMESPACE = "KUBETUNE_NAMESPACE"
ENV_GRACE_SECONDS = "KUBETUNE_GRACE_SECONDS"
ENV_COLLECTIVE_TIMEOUT = "KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS"
ENV_IO_TIMEOUT = "KUBETUNE_IO_TIMEOUT_SECONDS"  # trainer: how long ranks wait on rank 0's downloads and uploads
ENV_STATE_DIR = "KUBETUNE_STATE_DIR"
ENV_DEVICE_MEMORY = "KUBETUNE_DEVICE_MEMORY"  # one training device's memory (80Gi): validate's and the trainer's fit
# Set by the operator so any image runs under readOnlyRootFilesystem: home, caches and temporary files on volumes.
ENV_HOME = "HOME"
ENV_HF_HOME = "HF_HOME"
ENV_TMPDIR = "TMPDIR"
ENV_OMP_THREADS = "OMP_NUM_THREADS"  # the pod's cpu shared by its processes (no cgroup quota without a cpu limit)

# Credentials come from the Secret in spec.storage.secretRef via secretKeyRef.
SECRET_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
# spec.tracking.mlflow.secretRef: what MLflow's client reads from the environment (each optional).
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

DEFAULT_MASTER_PORT = 29500
DEFAULT_METRICS_PORT = 9400
DEFAULT_OPERATOR_METRICS_PORT = 9401
DEFAULT_GRACE_SECONDS = 30
GRACE_MARGIN_SECONDS = 15  # a pod's grace beyond the trainer's budget: torchrun passing SIGTERM on, exit
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 600
DEFAULT_IO_TIMEOUT_SECONDS = 24 * 3600

# Paths inside trainer pods.
SPEC_MOUNT_PATH = "/etc/kubetune/spec.yaml"
WORK_DIR = "/var/lib/kubetune"
TERMINATION_LOG = "/dev/termination-log"
TMP_DIR = "/tmp"  # the work volume's tmp/ folder, mounted here
HF_HOME_DIR = f"{WORK_DIR}/.cache/huggingface"  # as in the trainer image

# Labels on every child object.
LABEL_JOB_NAME = "kubetune.io/job-name"
LABEL_COMPONENT = "kubetune.io/component"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"

# Object layout under output.uri and checkpoint.uri.
MANIFEST_NAME = "manifest.json"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
MODEL_CARD = "README.md"
CURVES_FILE = "training-curves.png"  # loss and evaluation curves, beside metrics.json
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
DRY_RUN_DIR = "dry-run"  # a dry run's report, never a model
NOT_IMPROVED_DIR = "not-improved"  # a model that missed evaluation.minImprovement: its report only, no model

# Kubernetes recommended labels on every child object (with LABEL_JOB_NAME above).
LABEL_APP_NAME = "app.kubernetes.io/name"
LABEL_APP_INSTANCE = "app.kubernetes.io/instance"
LABEL_APP_COMPONENT = "app.kubernetes.io/component"
LABEL_APP_MANAGED_BY = "app.kubernetes.io/managed-by"
APP_NAME = "kubetune"
MANAGED_BY = "kubetune-operator"

# Status conditions (metav1.Condition types) and failure reasons a person can act on.
CONDITIONS = ("Created", "Validated", "Running", "Succeeded", "Failed", "Suspended", "Restarting", "Stalled",
              "Deployed", "SpecChanged",  # SpecChanged: an edit after start that the operator did not apply
              "Improved")  # Improved: the fine-tuned model beat its base on the test split (the termination's quality)
FAILURE_REASONS = ("InvalidInput", "PreflightFailed", "OOMKilled", "ImagePullBackOff", "ErrImagePull", "Unschedulable",
                   "DeadlineExceeded", "BackoffLimitExceeded", "Preempted", "TrainerError", "NotImproved")

# Trainer metrics on :9400/metrics (rank 0 has the job-level series; per-rank ones carry a `rank` label).
# Every series is labelled job=<FineTuneJob name>, namespace=<its namespace>. The operator scrapes
# METRIC_STEP, METRIC_TOTAL_STEPS, METRIC_EPOCH, METRIC_PROGRESS, METRIC_ETA, METRIC_TRAIN_LOSS,
# METRIC_EVAL_LOSS and METRIC_EVAL into status.progress / status.metrics.
METRIC_TRAIN_LOSS = "kubetune_train_loss"                     # gauge
METRIC_EVAL_LOSS = "kubetune_eval_loss"                       # gauge
METRIC_EVAL = "kubetune_eval_metric"                          # gauge, label metric=<accuracy|f1|...>
METRIC_LEARNING_RATE = "kubetune_learning_rate"               # gauge
METRIC_STEP = "kubetune_step"                                 # gauge: optimizer updates done
METRIC_TOTAL_STEPS = "kubetune_total_steps"                   # gauge
METRIC_EPOCH = "kubetune_epoch"                               # gauge (fractional)
METRIC_SAMPLES = "kubetune_samples_total"                     # counter
METRIC_TOKENS = "kubetune_tokens_total"                       # counter
METRIC_STEP_SECONDS = "kubetune_step_duration_seconds"        # histogram, label rank
METRIC_PROGRESS = "kubetune_progress_ratio"                   # gauge 0..1
METRIC_ETA = "kubetune_eta_seconds"                           # gauge
METRIC_DOWNLOADED = "kubetune_storage_downloaded_bytes_total"  # counter
METRIC_UPLOADED = "kubetune_storage_uploaded_bytes_total"      # counter
METRIC_CHECKPOINT_SECONDS = "kubetune_checkpoint_save_duration_seconds"  # histogram
METRIC_LAST_CHECKPOINT_STEP = "kubetune_last_checkpoint_step"  # gauge
METRIC_MEMORY = "kubetune_device_memory_bytes"                # gauge, label rank
METRIC_MEMORY_PEAK = "kubetune_device_memory_peak_bytes"      # gauge, label rank
METRIC_RESUMES = "kubetune_resumes_total"                     # counter
METRIC_STATE = "kubetune_state"                               # gauge 1/0, label state
TRAINER_STATES = ("setup", "training", "evaluating", "uploading", "done", "failed")

# Operator metrics on DEFAULT_OPERATOR_METRICS_PORT.
METRIC_OP_JOBS = "kubetune_operator_finetunejobs"             # gauge, labels namespace, phase
METRIC_OP_RECONCILE_SECONDS = "kubetune_operator_reconcile_duration_seconds"  # histogram
METRIC_OP_API_ERRORS = "kubetune_operator_api_errors_total"   # counter, label kind (http status or exception)
METRIC_OP_CHILDREN = "kubetune_operator_children_created_total"  # counter, label kind
METRIC_OP_RESTARTS = "kubetune_operator_gang_restarts_total"  # counter, labels namespace, job, reason
METRIC_OP_FAILURES = "kubetune_operator_job_failures_total"   # counter, labels namespace, reason (ended Failed)

# FineTuneSweep: a FineTuneJob template searched over (kubetune.sweep); each trial is a FineTuneJob it owns.
SWEEP_KIND = "FineTuneSweep"
SWEEP_PLURAL = "finetunesweeps"
SWEEP_SINGULAR = "finetunesweep"
SWEEP_SHORT_NAME = "fts"
LABEL_SWEEP = "kubetune.io/sweep"  # on each trial FineTuneJob: its sweep's name
LABEL_TRIAL = "kubetune.io/trial"  # the trial's index in its sweep
ANNOTATION_PARAMETERS = "kubetune.io/trial-parameters"  # JSON {path: value}: a restarted operator adopts the trial
SWEEP_FILE = "sweep.json"  # a sweep's summary, beside its trials' outputs
SWEEP_PLOT = "sweep.png"  # objective per trial and validation curves
