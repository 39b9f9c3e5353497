#!/usr/bin/env bash
# Every paper run, as commands to copy (this file is not meant to be executed as a whole).
# Set DATA, CKPT (released or trained checkpoints) and VGG (torchvision vgg16-397923af.pth for LPIPS).
# Flags given after --config override the file; add --log_dir DIR to resume automatically after a stop.
set -euo pipefail
DATA=${DATA:-/path/to/data}
CKPT=${CKPT:-/path/to/checkpoints}
VGG=${VGG:-/path/to/vgg16-397923af.pth}
N=${N:-8}   # processes (GPUs) per node; use torchrun --nproc_per_node $N instead of mpiexec if you prefer

############################################ EDM teachers ############################################
mpiexec -n $N python scripts/edm_train.py --config configs/imagenet64_edm.yaml --data_dir $DATA/imagenet64 --log_dir logs/edm_imagenet64
mpiexec -n $N python scripts/edm_train.py --config configs/lsun_bedroom256_edm.yaml --data_dir $DATA/lsun_bedroom256 --log_dir logs/edm_bedroom256
mpiexec -n $N python scripts/edm_train.py --config configs/lsun_cat256_edm.yaml --data_dir $DATA/lsun_cat256 --log_dir logs/edm_cat256
mpiexec -n $N python scripts/edm_train.py --config configs/cifar10_edm.yaml --data_dir $DATA/cifar10 --log_dir logs/edm_cifar10

################################## consistency distillation (CD) #####################################
mpiexec -n $N python scripts/cd_train.py --config configs/imagenet64_cd_l2.yaml --data_dir $DATA/imagenet64 --teacher_model_path $CKPT/edm_imagenet64_ema.pt --log_dir logs/cd_imagenet64_l2
mpiexec -n $N python scripts/cd_train.py --config configs/imagenet64_cd_lpips.yaml --data_dir $DATA/imagenet64 --teacher_model_path $CKPT/edm_imagenet64_ema.pt --lpips_vgg_path $VGG --log_dir logs/cd_imagenet64_lpips
mpiexec -n $N python scripts/cd_train.py --config configs/lsun_bedroom256_cd_l2.yaml --data_dir $DATA/lsun_bedroom256 --teacher_model_path $CKPT/edm_bedroom256_ema.pt --log_dir logs/cd_bedroom256_l2
mpiexec -n $N python scripts/cd_train.py --config configs/lsun_bedroom256_cd_lpips.yaml --data_dir $DATA/lsun_bedroom256 --teacher_model_path $CKPT/edm_bedroom256_ema.pt --lpips_vgg_path $VGG --log_dir logs/cd_bedroom256_lpips
mpiexec -n $N python scripts/cd_train.py --config configs/lsun_cat256_cd_lpips.yaml --data_dir $DATA/lsun_cat256 --teacher_model_path $CKPT/edm_cat256_ema.pt --lpips_vgg_path $VGG --log_dir logs/cd_cat256_lpips
mpiexec -n $N python scripts/cm_train.py --config configs/cifar10_cd_lpips.yaml --data_dir $DATA/cifar10 --teacher_model_path $CKPT/edm_cifar10_ema.pt --lpips_vgg_path $VGG --log_dir logs/cd_cifar10_lpips
mpiexec -n $N python scripts/cm_train.py --config configs/cifar10_cd_l2.yaml --data_dir $DATA/cifar10 --teacher_model_path $CKPT/edm_cifar10_ema.pt --log_dir logs/cd_cifar10_l2

##################################### consistency training (CT) ######################################
mpiexec -n $N python scripts/ct_train.py --config configs/imagenet64_ct.yaml --data_dir $DATA/imagenet64 --lpips_vgg_path $VGG --log_dir logs/ct_imagenet64
mpiexec -n $N python scripts/ct_train.py --config configs/lsun_bedroom256_ct.yaml --data_dir $DATA/lsun_bedroom256 --lpips_vgg_path $VGG --log_dir logs/ct_bedroom256
mpiexec -n $N python scripts/ct_train.py --config configs/lsun_cat256_ct.yaml --data_dir $DATA/lsun_cat256 --lpips_vgg_path $VGG --log_dir logs/ct_cat256
mpiexec -n $N python scripts/cm_train.py --config configs/cifar10_ct.yaml --data_dir $DATA/cifar10 --lpips_vgg_path $VGG --log_dir logs/ct_cifar10

############################## sampling: one step and two steps (Table 2) ##############################
IMNET="--config configs/imagenet64_cd_lpips.yaml"
LSUN="--config configs/lsun_bedroom256_cd_lpips.yaml"
mpiexec -n $N python scripts/image_sample.py $IMNET --training_mode consistency_distillation --sampler onestep --model_path $CKPT/cd_imagenet64_lpips.pt --num_samples 50000 --batch_size 256 --log_dir samples/cd_imagenet64_lpips_1step
mpiexec -n $N python scripts/image_sample.py $IMNET --training_mode consistency_distillation --sampler multistep --ts 0,22,39 --steps 40 --model_path $CKPT/cd_imagenet64_lpips.pt --num_samples 50000 --batch_size 256 --log_dir samples/cd_imagenet64_lpips_2step
mpiexec -n $N python scripts/image_sample.py $IMNET --training_mode consistency_distillation --sampler multistep --ts 0,22,39 --steps 40 --model_path $CKPT/cd_imagenet64_l2.pt --num_samples 50000 --batch_size 256 --log_dir samples/cd_imagenet64_l2_2step
mpiexec -n $N python scripts/image_sample.py $IMNET --training_mode consistency_training --sampler multistep --ts 0,106,200 --steps 201 --model_path $CKPT/ct_imagenet64.pt --num_samples 50000 --batch_size 256 --log_dir samples/ct_imagenet64_2step
mpiexec -n $N python scripts/image_sample.py $LSUN --training_mode consistency_distillation --generator determ-indiv --sampler multistep --ts 0,17,39 --steps 40 --model_path $CKPT/cd_bedroom256_lpips.pt --num_samples 50000 --batch_size 32 --log_dir samples/cd_bedroom256_lpips_2step
mpiexec -n $N python scripts/image_sample.py $LSUN --training_mode consistency_distillation --generator determ-indiv --sampler multistep --ts 0,18,39 --steps 40 --model_path $CKPT/cd_bedroom256_l2.pt --num_samples 50000 --batch_size 32 --log_dir samples/cd_bedroom256_l2_2step
mpiexec -n $N python scripts/image_sample.py $LSUN --training_mode consistency_training --generator determ-indiv --sampler multistep --ts 0,67,150 --steps 151 --model_path $CKPT/ct_bedroom256.pt --num_samples 50000 --batch_size 32 --log_dir samples/ct_bedroom256_2step
mpiexec -n $N python scripts/image_sample.py $LSUN --training_mode consistency_training --generator determ-indiv --sampler multistep --ts 0,62,150 --steps 151 --model_path $CKPT/ct_cat256.pt --num_samples 50000 --batch_size 32 --log_dir samples/ct_cat256_2step
# EDM teacher, Heun, 40 steps (79 network evaluations)
mpiexec -n $N python scripts/image_sample.py --config configs/imagenet64_edm.yaml --training_mode edm --sampler heun --steps 40 --model_path $CKPT/edm_imagenet64_ema.pt --num_samples 50000 --batch_size 64 --log_dir samples/edm_imagenet64

############################### ternary search of the two-step schedule ###############################
mpiexec -n $N python scripts/ternary_search.py $IMNET --begin 0 --end 39 --steps 40 --generator determ --ref_batch $DATA/VIRTUAL_imagenet64_labeled.npz --model_path $CKPT/cd_imagenet64_lpips.pt --num_samples 50000 --batch_size 256
mpiexec -n $N python scripts/ternary_search.py --config configs/imagenet64_ct.yaml --begin 0 --end 200 --steps 201 --generator determ --ref_batch $DATA/VIRTUAL_imagenet64_labeled.npz --model_path $CKPT/ct_imagenet64.pt --num_samples 50000 --batch_size 256

############################################ evaluation ############################################
python evaluations/evaluator.py $DATA/VIRTUAL_imagenet64_labeled.npz samples/cd_imagenet64_lpips_1step/samples_50000x64x64x3.npz

################################# zero-shot editing (Fig. 6, App. E) #################################
python scripts/image_edit.py $LSUN --training_mode consistency_distillation --model_path $CKPT/cd_bedroom256_lpips.pt --task inpaint --mask box --input bedroom.png --ts 0,20,39 --steps 40
python scripts/image_edit.py $LSUN --training_mode consistency_distillation --model_path $CKPT/cd_bedroom256_lpips.pt --task colorize --input bedroom.png --ts 0,20,39 --steps 40
python scripts/image_edit.py $LSUN --training_mode consistency_distillation --model_path $CKPT/cd_bedroom256_lpips.pt --task superres --factor 8 --input bedroom.png --ts 0,20,39 --steps 40
