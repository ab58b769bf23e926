"""The pipeline's stages, one module each: its config section, runner, identity, registration and command.

Importing this package registers every built-in stage with the engine (``jobembed.engine``), in the order they run,
and every built-in config section with ``jobembed.config``. A new stage is one module here: its section (beside its
worker, in ``jobembed.sections``, or in the module itself), a ``Stage`` with its ``command``, and one line below.
The graph today::

    prepare ──▶ clean ──▶ embed ──▶ head
                             ├────▶ triplets ──▶ finetune ──▶ embed-finetuned ──┐
                             │            └──▶ finetune-seeds (one unit per other seed) ─┤
                             ├────▶ finetune-cv (one unit per CV fold) ────────────┤
                             └─────────────────────────────────────────────────────┴─▶ report ──▶ bundle

``finetune`` and ``embed-finetuned`` are off unless ``finetune.enabled`` (``jobembed finetune RUN`` turns it on);
off, they neither run nor are read, and their folders are left as they are. ``finetune-seeds`` runs when
``finetune.seeds`` names a seed besides ``finetune.seed`` (``jobembed finetune RUN --seeds 13,14,15``).
``finetune-cv`` is off unless ``report.finetune_cv`` (``jobembed report RUN --finetune-cv``).

Run folder (``runs/<name>/``), each stage writing only its own folder, whole (see ``jobembed.engine``)::

    config.yaml        the resolved pipeline config; later commands on the run start from it
    manifest.json      per stage: resolved config, input digests, code version, package versions, git commit
    prepare/           {train,val,test}.parquet, labels.json, data_card.json, config.yaml, stage.json
    clean/             {train,val,test}.parquet (id, clean_text, clean_source, spans), report.md/json, config.yaml
    embed/             <encoder>-<fingerprint>/{train,val,test,labels}.npy + embeddings.json; stage.json
    triplets/          {train,val}.parquet (kept), candidates/, noise.csv, report.md/json
    finetune/          model/ (with its model card), finetune.json, log.jsonl, ads_seen.json; checkpoints/<key>/
    embed-finetuned/   the fine-tuned encoder's vectors, laid out like embed/
    finetune-seeds/    seed-<s>/{train,val,test,labels}.npy + seed.json, seeds.json; units/seed-<s>/ (finetune.json)
    finetune-cv/       fold-<k>/{dev,labels}.npy + fold.json, folds.json; units/fold-<k>/ (its triplets, finetune.json)
    head/              bundle of the MLP head on embed.model; stage.json
    report/            report.md, metrics.json, per_class/, figures/, winner/; stage.json
    bundle/            the deployable bundle of the report's winner (bundle); stage.json
"""

from jobembed.config import register_section, sections_complete
from jobembed.engine import STAGES, check_run_dir, config_for_run, pin_models, run_stages
from jobembed.sections import ClassifyConfig, ServeConfig

# isort: off
# One line per stage, in run order: a stage registers after the stages it reads.
from jobembed.stages import prepare  # noqa: F401
from jobembed.stages import clean  # noqa: F401
from jobembed.stages import embed  # noqa: F401
from jobembed.stages import head  # noqa: F401
from jobembed.stages import triplets  # noqa: F401
from jobembed.stages import finetune  # noqa: F401
from jobembed.stages import finetune_seeds  # noqa: F401
from jobembed.stages import finetune_cv  # noqa: F401
from jobembed.stages import report  # noqa: F401
from jobembed.stages import bundle  # noqa: F401

# isort: on
from jobembed.stages._common import prepared, run_vectors
from jobembed.stages.finetune import centroid_data, finetuned_model, finetuned_vectors
from jobembed.stages.report import refuse_leaky_encoders
from jobembed.stages.triplets import triplet_inputs

# The sections of the commands that use a bundle (classify, serve): no stage of their own.
register_section("classify", ClassifyConfig)
register_section("serve", ServeConfig)
sections_complete()

__all__ = [
    "STAGES",
    "centroid_data",
    "check_run_dir",
    "config_for_run",
    "finetuned_model",
    "finetuned_vectors",
    "pin_models",
    "prepared",
    "refuse_leaky_encoders",
    "run_stages",
    "run_vectors",
    "triplet_inputs",
]
