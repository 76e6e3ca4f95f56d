"""What vulture cannot see used: gin binds these from gin/*.gin, and flax, SeqIO and T5X
call the hooks by name. `.ci/run` passes this file to vulture beside dsbs_jax/."""

from dsbs_jax import (
    cli,
    gin_utils,
    models,
    network,
    optimizers,
    partitioning,
    server,
    t5x_bridge,
    teachers,
)
from dsbs_jax.data import feature_converters, tasks

optimizers.create_optimizer  # gin/train.gin
partitioning.preset_rules  # gin/train.gin
tasks.deployed_task  # gin/t5x_bridge.gin
t5x_bridge.StepByStepT5XModel  # gin/t5x_bridge.gin
t5x_bridge.StepByStepTrainer  # gin/t5x/finetune.gin
t5x_bridge.StepByStepTrainer._partitioned_train_step  # T5X's trainer calls it
t5x_bridge.TokenAverage.compute  # CLU metrics
network.Embed.setup  # flax
network.Transformer.setup  # flax
feature_converters.StepByStepFeatureConverter._convert_features  # SeqIO
gin_utils._Syntax.configurable_reference  # gin's parser delegate
models.StepByStepModel.score_batch  # T5X's scoring (t5x.infer mode 'score')
cli.experiment_console_main  # pyproject.toml: dsbs-experiment
tasks.RowsSource.performs_internal_shuffling  # SeqIO
server._Common.model_config  # pydantic's settings
server.create_app.invalid  # FastAPI calls the handlers its decorators register
server.create_app.http_error
server.create_app.authorize
teachers.CausalLM.tokenizer.padding_side  # transformers' tokenizer reads it
cli.teacher_console_main  # pyproject.toml: dsbs-teacher
cli.serve_console_main  # pyproject.toml: dsbs-serve
server.create_app.failed
