from ppo_train.cli import main

main()
