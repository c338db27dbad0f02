#!/usr/bin/env bash
# The SODA study's run.sh (sunbing7/SODA), for Fashion-MNIST striped T-shirts (class 0 ->
# class 2, "pullover") with MobileNetV2 and --ana_layer 4, following the study's README steps
# with the FMNIST hyperparameters of its data/commands.txt (L93-L98). See docs/study_compat.md.
#
# Run from anywhere; data and models go under the repository's ./data and ./save, as in the study.
# PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python).
set -euo pipefail
cd "$(dirname "$0")"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
# EPOCHS=N shortens step 1 (the study trains 100 epochs: days on a CPU; one epoch of
# MobileNetV2 on Fashion-MNIST takes about 6 minutes on 2 CPU cores). The schedule scales with it.
EPOCHS=${EPOCHS:-100}

# Data: the study's HDF5 layout (group 'data' with x_train, y_train, x_test, y_test; 28x28 uint8).
# Written once from real Fashion-MNIST (apt-get install dataset-fashion-mnist) if it is not there.
[ -f ./data/FMNIST/fmnist.h5 ] || $PY semantic_mitigation.py --option=export_h5 --data_name=FMNIST --data_set=./data/FMNIST/fmnist.h5

# Step 1: train a semantic-backdoored model (striped T-shirts -> pullover).
$PY train_backdoor_sem.py --option=semtrain --lr=0.1 --arch=MobileNetV2 --ratio=0.3125 --resume=0 --epoch=$EPOCHS --schedule $((EPOCHS / 2 > 0 ? EPOCHS / 2 : 1)) $EPOCHS --checkpoint=na --batch_size=64 --poison_type=semantic --poison_target=2 --output_dir=./save --t_attack=stripet --data_dir=./data/FMNIST --data_set=./data/FMNIST/fmnist.h5 --data_name=FMNIST --num_class=10
# The study then fine-tunes the epoch-99 checkpoint (commands.txt L94); here the _last file is that model:
#$PY train_backdoor_sem.py --option=semtune --lr=0.01 --arch=MobileNetV2 --ratio=0.6875 --resume=1 --epoch=5 --schedule 5 10 --checkpoint=./save/model_semtrain_MobileNetV2_FMNIST_stripet_last.th --batch_size=64 --poison_type=semantic --poison_target=2 --output_dir=./save --t_attack=stripet --data_dir=./data/FMNIST --data_set=./data/FMNIST/fmnist.h5 --data_name=FMNIST --num_class=10

# Step 2: semantic backdoor detection (causal attribution, then target and source classes).
$PY semantic_mitigation.py --option=causality_analysis --reanalyze=1 --arch=MobileNetV2 --poison_type=semantic --ana_layer 4 --plot=0 --batch_size=64 --num_sample=256 --poison_target=2 --in_model=./save/model_semtrain_MobileNetV2_FMNIST_stripet_last.th --output_dir=./save --t_attack=stripet --data_set=./data/FMNIST/fmnist.h5 --data_name=FMNIST --num_class=10
$PY semantic_mitigation.py --option=detect --reanalyze=1 --arch=MobileNetV2 --poison_type=semantic --confidence=3 --confidence2=2 --ana_layer 4 --plot=0 --batch_size=64 --num_sample=256 --poison_target=2 --in_model=./save/model_semtrain_MobileNetV2_FMNIST_stripet_last.th --output_dir=./save --t_attack=stripet --data_set=./data/FMNIST/fmnist.h5 --data_name=FMNIST --num_class=10

# Step 3: reconstruct infected samples (writes ./data/FMNIST/advsample_stripet.npy).
$PY semantic_mitigation.py --option=gen_trigger --lr=0.1 --potential_source=0 --poison_target=2 --reg=0.9 --epoch=2000 --arch=MobileNetV2 --poison_type=semantic --batch_size=64 --num_sample=100 --in_model=./save/model_semtrain_MobileNetV2_FMNIST_stripet_last.th --output_dir=./save --t_attack=stripet --data_set=./data/FMNIST/fmnist.h5 --data_dir=./data/FMNIST --data_name=FMNIST --num_class=10

# Step 4: remove the semantic backdoor (writes ./save/model_finetune_stripet_last.th).
$PY semantic_mitigation.py --option=remove --lr=0.01 --reg=0.0005 --epoch=5 --top=0.5 --arch=MobileNetV2 --poison_type=semantic --ana_layer 4 --batch_size=64 --potential_source=0 --poison_target=2 --in_model=./save/model_semtrain_MobileNetV2_FMNIST_stripet_last.th --output_dir=./save --t_attack=stripet --data_dir=./data/FMNIST --data_set=./data/FMNIST/fmnist.h5 --data_name=FMNIST --num_class=10

# Check the repaired model (acc, asr, and R-ASR on the reconstructed samples).
$PY semantic_mitigation.py --option=test --test_reverse=1 --arch=MobileNetV2 --poison_type=semantic --batch_size=64 --poison_target=2 --in_model=./save/model_finetune_stripet_last.th --output_dir=./save --t_attack=stripet --data_set=./data/FMNIST/fmnist.h5 --data_dir=./data/FMNIST --data_name=FMNIST --num_class=10
